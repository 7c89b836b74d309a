"""Statement pinning: the verified file always carries the reference header and statement.

Completion outputs are appended to the reference statement. Whole-file outputs keep only the model's
proof (after its `theorem <name> ... := by`) and any helper `theorem`/`lemma`s before it; every other
command before the theorem (namespace, instance, notation, open, variable...) is refused, so nothing
can change what the statement means.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .dataset import Problem
from .leantext import find_top_level
from .textguard import lex, word_hits


class PinError(ValueError):
    """The candidate cannot be tied to the reference statement."""


@dataclass(frozen=True)
class Candidate:
    text: str
    kind: str  # "completion": continues formal_statement; "file": a whole Lean file

    def __post_init__(self) -> None:
        if self.kind not in ("completion", "file"):
            raise ValueError(f"candidate kind must be 'completion' or 'file', not {self.kind!r}")


@dataclass(frozen=True)
class PinnedFile:
    code: str  # what Lean checks
    authored: str  # the model-written parts of `code`, which the text layer scans


def decl_pattern(name: str) -> re.Pattern:
    """A `theorem`/`lemma` declaration of exactly `name` (not `name'` or `name.foo`)."""
    return re.compile(r"(?m)^[ \t]*(?:theorem|lemma)[ \t]+" + re.escape(name) + r"(?![\w'.])")


def proof_start(code: str, start: int) -> int:
    """Offset just after the `:= by` that opens the proof of the declaration beginning at `start`."""
    i = find_top_level(code, ":=", start)
    if i < 0:
        raise PinError("no `:=` after the theorem statement")
    m = re.compile(r":=\s*by(?![\w'])").match(code, i)
    if not m:
        raise PinError("the proof must be a tactic block (`:= by ...`)")
    return m.end()


# Commands that could sit inside a helper's text (Lean needs no line break or column 0 to start one) and
# would then apply to the pinned statement after it, e.g. `open Foo in` or `set_option ... in`.
_PREAMBLE_COMMANDS = ("open", "set_option", "section", "end", "universe", "noncomputable", "def", "abbrev",
                      "class", "structure", "inductive", "example", "mutual", "deriving", "private", "protected",
                      "export", "namespace", "variable", "include", "omit", "attribute", "instance", "local",
                      "scoped", "notation", "macro", "syntax")


def _helpers(preamble: str, blanked: str, header: str) -> str:
    """Helper theorems/lemmas written before the main theorem; anything else is refused."""
    header_lines = {line.strip() for line in header.splitlines() if line.strip()}
    kept: list[str] = []
    kept_blanked: list[str] = []
    in_decl = False
    for raw, line in zip(preamble.split("\n"), blanked.split("\n")):
        if not line.strip():
            if in_decl:
                kept.append(raw)
                kept_blanked.append(line)
            continue
        if line[0].isspace():
            if not in_decl:
                raise PinError(f"unexpected text before the theorem: {raw.strip()[:80]!r}")
        elif line.strip() in header_lines:
            in_decl = False
            continue
        elif re.match(r"(?:theorem|lemma)\s", line):
            in_decl = True
        else:
            raise PinError(f"command before the theorem is not allowed: {raw.strip()[:80]!r}")
        kept.append(raw)
        kept_blanked.append(line)
    code = "\n".join(kept_blanked)
    for start in word_hits(code, _PREAMBLE_COMMANDS):
        line = code[start:].split("\n", 1)[0].strip()
        raise PinError(f"command before the theorem is not allowed: {line[:80]!r}")
    return "\n".join(kept).strip("\n")


def _blanked(text: str) -> str:
    """The text with comments and literals blanked; refused where the blanking could misread Lean.

    Declarations and helper lines are found on the blanked text only, so a misread literal would let
    commands pass as the inside of a helper (fail closed, see `textguard.Lexed`).
    """
    lexed = lex(text)
    if lexed.problems:
        offset, why = lexed.problems[0]
        raise PinError(f"line {text.count(chr(10), 0, offset) + 1}: {why}")
    return lexed.blanked


def pin(problem: Problem, candidate: Candidate) -> PinnedFile:
    statement = problem.formal_statement
    if not statement.rstrip().endswith(":= by"):
        raise PinError(f"{problem.name}: reference statement does not end with ':= by'")
    head = problem.header + problem.informal_prefix + statement.rstrip()
    if candidate.kind == "completion":
        # As DeepSeek-Prover-V1.5 builds the file: the completion starts on the line after `:= by`. Appended to
        # the `by` line instead, its first tactic would sit at another column than the next ones, and Lean's
        # tactic blocks need one column: every multi-line completion would fail to parse.
        body = candidate.text.removeprefix("\n")
        return PinnedFile(head + "\n" + body, body)
    text = candidate.text
    blanked = _blanked(text)
    decls = list(decl_pattern(problem.name).finditer(blanked))
    if not decls:
        raise PinError(f"the output never states `theorem {problem.name}`")
    if len(decls) > 1:
        raise PinError(f"`{problem.name}` is declared {len(decls)} times")
    start = decls[0].start()
    proof = text[proof_start(blanked, start):]
    helpers = _helpers(text[:start], blanked[:start], problem.header)
    prefix = problem.header + (helpers + "\n\n" if helpers else "")
    code = prefix + problem.informal_prefix + statement.rstrip() + proof
    return PinnedFile(code, helpers + "\n" + proof)
