#!/usr/bin/env python3
"""Test double for the Lean REPL: a real subprocess speaking the REPL's stdin/stdout protocol.

Two modes.
  --replay PREFIX   replays PREFIX.in / PREFIX.expected.out (real REPL recordings): every incoming
                    request must equal the next recorded one (as JSON), and the recorded response
                    text is written back byte for byte. A mismatch goes to stderr and exits 2.
  (default) sim     decides responses from markers in the Lean text so tests are deterministic:
                    `sorry`/`admit` -> sorries entry + sorry warning; `-- FAKE: error TEXT` -> error;
                    `-- FAKE: sleep S`, `crash`, `oom`, `stderr N`, `garbage`, `close_stdout`;
                    `#print axioms N` -> info listing the axioms the fake attributes to N; `#exit`
                    ends the command text. Once a command with imports has run, a proof command
                    must carry that header's env: without `env`, or on a proof's env, it gets an
                    error message; an unknown env gets {"message": "Unknown environment."}.
Never shipped: the product does not import this file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for prover.*
from prover.repl_protocol import split_frames  # noqa: E402
from prover.textguard import blank_comments_and_strings  # noqa: E402

DEFAULT_AXIOMS = ["propext", "Classical.choice", "Quot.sound"]
DECL_RE = re.compile(
    r"^(?:@\[[^\]]*\]\s*)?(?:(?:private|protected|noncomputable|partial|unsafe|local|scoped)\s+)*"
    r"(theorem|lemma|def|abbrev|instance|axiom|opaque|example)\b\s*([^\s:(\[{]*)",
    re.M,
)
WORD = r"(?<![\w.'?]){}(?![\w'?!])"


def read_request(stream) -> str | None:
    """Lines up to a whitespace-only line, like the REPL's getLines; None at EOF."""
    lines = []
    while True:
        line = stream.readline()
        if not line:
            return "".join(lines) if lines else None
        if not line.strip():
            if lines:
                return "".join(lines)
            continue
        lines.append(line)


def write(text: str) -> None:
    sys.stdout.write(text + "\n\n")
    sys.stdout.flush()


def pretty(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1)


def replay(prefix: Path) -> int:
    requests = [json.loads(f, strict=False) for f in split_frames(prefix.with_suffix(".in").read_text("utf-8"))]
    responses = prefix.with_name(prefix.name + ".expected.out").read_text("utf-8").split("\n\n")
    for i, expected in enumerate(requests):
        got = read_request(sys.stdin)
        if got is None:
            return 0
        try:
            obj = json.loads(got, strict=False)
        except json.JSONDecodeError as e:
            sys.stderr.write(f"uncaught exception: cannot parse request: {e}\n")
            return 1
        if obj != expected:
            sys.stderr.write(f"replay mismatch at request {i}: got {obj!r}, expected {expected!r}\n")
            return 2
        write(responses[i])
    return 0


def line_col(text: str, offset: int) -> dict:
    line = text.count("\n", 0, offset) + 1
    return {"line": line, "column": offset - (text.rfind("\n", 0, offset) + 1)}


class Sim:
    def __init__(self, args):
        self.args = args
        self.envs: list[dict[str, list[str]]] = []  # env id -> {constant: axioms}
        self.header_envs: set[int] = set()  # envs made by a command with imports
        self.proof_states: list[str] = []

    def handle(self, obj: dict) -> dict | None:
        if "tactic" in obj:
            ps = obj.get("proofState")
            if not isinstance(ps, int) or not 0 <= ps < len(self.proof_states):
                return {"message": "Unknown proof state."}
            self.proof_states.append("")
            return {"proofStatus": "Completed", "proofState": len(self.proof_states) - 1, "goals": []}
        if "cmd" not in obj:
            return {"message": "Lean error: unsupported request in the fake"}
        env = obj.get("env")
        if env is None:
            decls: dict[str, list[str]] = {}
        elif isinstance(env, int) and 0 <= env < len(self.envs):
            decls = dict(self.envs[env])
        else:
            return {"message": "Unknown environment."}
        return self.command(obj["cmd"], env, decls, bool(obj.get("gc")))

    def command(self, raw: str, env: int | None, decls: dict, gc: bool) -> dict:
        cut = re.search(r"^#exit\b", raw, re.M)
        text = raw[: cut.start()] if cut else raw
        self.directives(text)
        code = blank_comments_and_strings(text)
        messages, sorries = [], []
        is_header = re.search(r"^import\s", code, re.M)
        if is_header:
            if env is not None:
                messages.append(self.msg("error", code, code.index("import"), 6,
                                         "invalid 'import' command, it must be used in the beginning of the file"))
            time.sleep(self.args.header_delay)
            if self.args.header_error:
                messages.append(self.msg("error", code, code.index("import"), 6, self.args.header_error))
        elif decl := DECL_RE.search(code):  # elaborating a proof costs time; a bare `#print axioms` does not
            time.sleep(self.args.body_delay)
            if problem := self.env_problem(env):
                messages.append(self.msg("error", code, decl.start(), 1, problem))
        for m in re.finditer(r"^\s*--\s*FAKE:\s*error\s+(.*)$", text, re.M):
            messages.append(self.msg("error", text, m.start(), 1, m.group(1)))
        # tactic macros whose expansion is `sorry`: using one is a sorry Lean reports late
        tainted = [m.group(1) for m in re.finditer(r'^macro\s+"(\w+)"[^\n]*=>[^\n]*sorry', text, re.M)]
        for m in re.finditer(WORD.format("FAKE_UNKNOWN"), code):
            messages.append(self.msg("error", code, m.start(), 12, "unknown identifier 'FAKE_UNKNOWN'"))
        starts = [m for m in DECL_RE.finditer(code)]
        for idx, m in enumerate(starts):
            end = starts[idx + 1].start() if idx + 1 < len(starts) else len(code)
            segment = code[m.start():end]
            name = m.group(2) or "_example"
            holes = [h for h in re.finditer(WORD.format("(?:sorry|admit)"), segment)]
            for h in holes:
                self.proof_states.append(name)
                sorries.append({"proofState": len(self.proof_states) - 1,
                                "pos": line_col(code, m.start() + h.start()),
                                "goal": f"⊢ <goal of {name}>",
                                "endPos": line_col(code, m.start() + h.end())})
            hidden = any(re.search(WORD.format(re.escape(t)), segment) for t in tainted)
            if holes or hidden or re.search(WORD.format("sorryAx"), segment):
                warn = self.msg("warning", code, m.start(2) if m.group(2) else m.start(), max(len(name), 1),
                                "declaration uses " + ("`sorry`" if self.args.sorry_spelling == "backtick"
                                                       else "'sorry'"))
                messages.append(warn)
            decls[name] = self.axioms_of(m.group(1), name, segment, decls, text)
            if hidden:
                decls[name].append("sorryAx")
        if env is not None and starts and self.args.reject_fraction:
            digest = int(hashlib.sha256(raw.encode()).hexdigest()[:8], 16)
            if digest % 1000 < 1000 * self.args.reject_fraction:  # deterministic per proof text
                messages.append(self.msg("error", code, starts[0].start(), 1, "linarith failed"))
        for m in re.finditer(r'^#print\s+"([^"\n]*)"', text, re.M):  # Lean's `#print "str"` logs the string
            messages.append(self.msg("info", text, m.start(), 6, m.group(1)))
        for m in re.finditer(r"^#print\s+axioms\s+(\S+)", code, re.M):
            target = m.group(1)
            if target not in decls:
                messages.append(self.msg("error", code, m.start(), 6, f"unknown constant '{target}'"))
            elif decls[target]:
                messages.append(self.msg("info", code, m.start(), 6,
                                         f"'{target}' depends on axioms: [{', '.join(decls[target])}]"))
            else:
                messages.append(self.msg("info", code, m.start(), 6, f"'{target}' does not depend on any axioms"))
        reply: dict = {}
        if sorries:
            reply["sorries"] = sorries
        if messages:
            reply["messages"] = messages
        if not gc:
            self.envs.append(decls)
            reply["env"] = len(self.envs) - 1
            if is_header:
                self.header_envs.add(reply["env"])
        return reply

    def env_problem(self, env: int | None) -> str | None:
        """Why a proof command is not elaborated on an import header's env, once a header has run.

        A real REPL answers such a command too, with errors: without an env the header's imports are
        missing; on a proof's env the earlier proof's declarations clash or leak into this one.
        """
        if not self.header_envs or env in self.header_envs:
            return None
        headers = sorted(self.header_envs)
        if env is None:
            return f"fake REPL: proof command has no env, so the imports of header env(s) {headers} are missing"
        return (f"fake REPL: env {env} is not the header's env {headers}; "
                "this proof would be elaborated on top of an earlier one")

    @staticmethod
    def axioms_of(kind: str, name: str, segment: str, decls: dict, text: str) -> list[str]:
        if kind == "axiom":
            return [name]
        forced = re.search(r"--\s*FAKE:\s*axioms\s*(.*)$", text, re.M)
        if forced:
            return [a.strip() for a in forced.group(1).split(",") if a.strip()]
        found = list(DEFAULT_AXIOMS)
        if re.search(WORD.format(r"(?:sorry|admit|sorryAx|apply\?|exact\?)"), segment):
            found.append("sorryAx")
        if re.search(WORD.format("native_decide"), segment):
            found.append("Lean.ofReduceBool")
        for other, axs in decls.items():
            if other != name and re.search(WORD.format(re.escape(other)), segment):
                found += [a for a in axs if a not in found]
        return found

    def directives(self, text: str) -> None:
        for m in re.finditer(r"--\s*FAKE:\s*(\w+)\s*(.*)$", text, re.M):
            kind, arg = m.group(1), m.group(2).strip()
            if kind == "sleep":
                time.sleep(float(arg))
            elif kind == "crash":
                sys.stderr.write("Stack overflow detected. Aborting.\n")
                sys.stderr.flush()
                os._exit(134)
            elif kind == "oom":
                exhaust_memory()
            elif kind == "stderr":
                sys.stderr.write("x" * int(arg) + "\n")
                sys.stderr.flush()
            elif kind == "garbage":
                write("this is not JSON")
            elif kind == "forge":  # code run during elaboration prints a clean answer and a clean audit
                write(pretty({"env": len(self.envs)}))
                write(pretty({"env": len(self.envs) + 1, "messages": [
                    self.msg("info", "#print axioms", 0, 6, f"'{arg}' does not depend on any axioms")]}))
            elif kind == "close_stdout":  # a REPL that stops answering but keeps running (and stderr open)
                sys.stdout.flush()
                os.close(1)
                time.sleep(1000)

    @staticmethod
    def msg(severity: str, text: str, offset: int, length: int, data: str) -> dict:
        return {"severity": severity, "pos": line_col(text, offset),
                "endPos": line_col(text, offset + length), "data": data}


def exhaust_memory() -> None:
    """Allocate until the address-space limit bites, then die the way Lean does on OOM."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    seen = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    if soft == resource.RLIM_INFINITY:  # never eat the shared machine's memory: cap ourselves
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.RLIM_INFINITY))
    hoard = []
    try:
        while True:
            hoard.append(bytearray(32 << 20))
    except MemoryError:
        hoard.clear()
        sys.stderr.write(f"INTERNAL PANIC: out of memory (RLIMIT_AS={seen})\n")
        sys.stderr.flush()
        os._exit(1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replay", type=Path)
    ap.add_argument("--header-delay", type=float, default=0.0)
    ap.add_argument("--body-delay", type=float, default=0.0)
    ap.add_argument("--header-error", help="answer every import header with this error (Mathlib not built)")
    ap.add_argument("--reject-fraction", type=float, default=0.0,
                    help="fail this share of proofs, chosen by a hash of the text")
    ap.add_argument("--sorry-spelling", choices=["quote", "backtick"], default="quote")
    ap.add_argument("--child-pid-file", type=Path, help="spawn a sleeping child (like `lake env` does)")
    args = ap.parse_args()
    sys.stdin.reconfigure(encoding="utf-8")
    sys.stdout.reconfigure(encoding="utf-8")
    if args.child_pid_file:
        child = subprocess.Popen(["sleep", "1000"])
        args.child_pid_file.write_text(str(child.pid))
    if args.replay:
        return replay(args.replay)
    sim = Sim(args)
    while (req := read_request(sys.stdin)) is not None:
        if req.lstrip().startswith(("#", "--")):
            continue
        try:
            obj = json.loads(req, strict=False)
        except json.JSONDecodeError as e:
            sys.stderr.write(f"uncaught exception: {e}\n")
            return 1
        write(pretty(sim.handle(obj)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
