"""Logic of the "Prove (Lean 4)" tab, kept free of Gradio so it can be tested without a browser.

Everything that decides whether a proof counts goes through `prover` itself: backends are built by
`prover.backends.make_backend`, proofs are checked by `prover.checker.Checker` (statement pin, text
layer, Lean, axiom audit), sketches are split and stitched by `prover.decompose`. With no backend
configured the tab shows the prover's own setup message and never reports a proof as verified.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from prover.backends import BackendConfig, BackendNotConfigured, make_backend
from prover.checker import CheckConfig, Checker
from prover.dataset import DEFAULT_HEADER, VARIANT_FILES, Problem, load_few_shot, load_minif2f
from prover.decompose import (
    DecomposeConfig,
    DecompositionError,
    Ledger,
    Subgoal,
    parse_sketch,
    prove_by_decomposition,
    subgoals,
)
from prover.generators import GenerationError, Generator, OpenAIConfig, OpenAIGenerator, PortfolioGenerator
from prover.leantext import find_top_level, split_header
from prover.pinning import Candidate, PinError, decl_pattern
from prover.prompts import STYLES
from prover.textguard import blank_comments_and_strings, scan
from prover.verdict import Verdict

DEFAULT_VARIANT = "deepseek_v15"
VARIANTS = tuple(sorted(VARIANT_FILES))
_DECL = re.compile(r"(?m)^[ \t]*(?:theorem|lemma)[ \t]+([^\s:(\[{⦃]+)")
_HEADER_LINE = re.compile(r"^(?:import|open|set_option)\s")


# --- backend ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeanSettings:
    """The Lean flags of `python -m demos`, named as in `python -m prover`."""

    backend: str | None = None  # "repl" | "kimina" | "leandojo"; inferred from repl_cmd / kimina_url
    repl_cmd: str | None = None
    repl_cwd: str | None = None
    kimina_url: str | None = None
    lean_workers: int = 1
    memory_limit_gb: float | None = 10.0
    timeout: float = 300.0
    backend_config: Path | None = None
    allow_unaudited: bool = False

    def to_backend_config(self) -> BackendConfig:
        if self.backend_config:
            cfg = BackendConfig.from_file(self.backend_config)
            return cfg if self.backend is None else BackendConfig(**{**cfg.__dict__, "kind": self.backend})
        kind = self.backend or ("repl" if self.repl_cmd else "kimina" if self.kimina_url else None)
        return BackendConfig(
            kind=kind,
            repl_cmd=self.repl_cmd,
            repl_cwd=self.repl_cwd,
            workers=self.lean_workers,
            memory_limit_gb=self.memory_limit_gb,
            kimina_url=self.kimina_url,
        )


def make_checker(settings: LeanSettings) -> tuple[Checker | None, str]:
    """(checker, one-line description) or (None, the prover's setup message)."""
    cfg = settings.to_backend_config()
    try:
        backend = make_backend(cfg)
    except BackendNotConfigured as e:
        return None, str(e)
    config = CheckConfig(timeout=settings.timeout, require_audit=cfg.kind != "leandojo" or not settings.allow_unaudited)
    if cfg.kind == "repl":
        where = f" in `{cfg.repl_cwd}`" if cfg.repl_cwd else ""
        description = f"Lean REPL pool: `{cfg.repl_cmd}`{where}, {cfg.workers} worker(s)"
    elif cfg.kind == "kimina":
        description = f"Kimina Lean Server at {cfg.kimina_url}"
    else:
        description = f"LeanDojo ({cfg.leandojo_repo} @ {cfg.leandojo_commit})"
    return Checker(backend, config), description


# --- pasted theorems -------------------------------------------------------------------------------
def problem_from_text(text: str) -> Problem:
    """A Problem stated by pasted Lean: its last top-level `theorem`/`lemma`, up to `:= by`.

    Only helper lemmas may precede the pasted theorem (the statement pin refuses anything else), so the
    last declaration is the user's theorem: the one that is named, pinned and audited.
    Header: the pasted `import`/`open`/`set_option` lines when it has imports, otherwise the miniF2F
    header plus any pasted `open`/`set_option` lines. Everything else before the theorem stays in
    the candidate, where the statement pin allows only helper lemmas.
    """
    blanked = blank_comments_and_strings(text)
    decl = _last_decl(blanked)
    if decl is None:
        raise ValueError("no `theorem NAME ... := by` found in the pasted text")
    name = decl.group(1)
    assign = find_top_level(blanked, ":=", decl.start())
    if assign < 0 or not re.match(r":=\s*by(?![\w'])", blanked[assign:]):
        raise ValueError(f"`{name}` must be stated as `theorem {name} ... := by` (a tactic proof)")
    header = _pasted_header(text[: decl.start()], blanked[: decl.start()])
    statement = text[decl.start() : assign].strip() + " := by\n"
    # The pasted header and statement become the trusted part of the checked file, so they pass the
    # same text layer as proofs: no `set_option debug.*` in the header, no `sorry` inside a hypothesis.
    # The leading import lines only choose the environment (as in `Checker.check_unpinned`), so they are
    # not scanned: `import Mathlib.Tactic` names the meta API but runs nothing.
    _, after_imports, _ = split_header(header)
    findings = scan(after_imports + statement)
    if findings:
        raise ValueError("the pasted statement is refused: " + "; ".join(f"{f.rule}: {f.snippet}" for f in findings))
    return Problem(name, "pasted", header, "", statement)


def _last_decl(blanked: str) -> re.Match | None:
    """The last `theorem`/`lemma` declaration in comment-blanked text, or None."""
    decls = list(_DECL.finditer(blanked))
    return decls[-1] if decls else None


def _pasted_header(before: str, blanked: str) -> str:
    """The header of a pasted theorem from the text before it (header lines are found outside comments)."""
    raw_lines, blanked_lines = before.split("\n"), blanked.split("\n")
    lines = [raw.rstrip() for raw, b in zip(raw_lines, blanked_lines) if _HEADER_LINE.match(b)]
    if any(line.startswith("import") for line in lines):
        return "\n".join(lines) + "\n\n"
    return DEFAULT_HEADER + "".join(line + "\n" for line in lines if line not in DEFAULT_HEADER)


def mismatch_error(problem: Problem, code: str) -> str | None:
    """Why pasted code cannot be a proof of the selected problem: it declares another theorem instead.

    Without this, a whole `theorem foo ...` would be indented and checked as a tactic block under the
    reference statement.
    """
    blanked = blank_comments_and_strings(code)
    if decl_pattern(problem.name).search(blanked):
        return None
    decl = _last_decl(blanked)
    if decl is None:
        return None
    return (
        f"the pasted theorem `{decl.group(1)}` is not the selected problem `{problem.name}`: rename it, "
        'or choose "(none ...)" to check it as a theorem of its own'
    )


def tactic_block(code: str) -> Candidate:
    """A pasted tactic proof as a completion of the statement: on its own lines, indented."""
    lines = code.strip("\n").splitlines()
    if lines and not lines[0][:1].isspace():
        lines = ["  " + line if line.strip() else line for line in lines]
    return Candidate("\n" + "\n".join(lines) + "\n", "completion")


# --- reports ---------------------------------------------------------------------------------------
@dataclass
class ProveReport:
    """What the tab shows: a verdict line, details, the checked file and a table."""

    status: str  # a prover Verdict status, or "not_verified" / "input_error"
    verified: bool
    headline: str
    details: str = ""
    code: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        mark = "✅" if self.verified else "❌"
        return f"### {mark} {self.headline}\n\n{self.details}".rstrip()


def input_error(message: str) -> ProveReport:
    return ProveReport("input_error", False, "Cannot run", message)


def verdict_details(verdict: Verdict) -> str:
    """Reason, Lean messages and the axiom audit as Markdown."""
    parts = []
    if verdict.reason:
        parts.append(f"**Reason:** `{verdict.reason}`")
    if verdict.messages:
        lines = []
        for m in verdict.messages:
            where = f"{m.pos.line}:{m.pos.column} " if m.pos else ""
            lines.append(f"- {m.severity} {where}`{' '.join(m.data.split())[:300]}`")
        parts.append("**Lean messages:**\n" + "\n".join(lines))
    if verdict.axioms is not None:
        parts.append("**Axioms:** " + (", ".join(f"`{a}`" for a in verdict.axioms) or "none"))
    if verdict.stderr.strip():
        parts.append(f"**stderr:** `{verdict.stderr.strip()[-300:]}`")
    parts.append(f"Lean time: {verdict.time_s:.2f} s")
    return "\n\n".join(parts)


def verdict_report(verdict: Verdict, code: str, headline_ok: str) -> ProveReport:
    if verdict.complete:
        return ProveReport(verdict.status.value, True, headline_ok, verdict_details(verdict), code)
    return ProveReport(
        verdict.status.value, False, f"Not verified: {verdict.status.value}", verdict_details(verdict), code
    )


@dataclass(frozen=True)
class GeneratorChoice:
    """Which generator "Prove" uses: the model-free tactic portfolio or an OpenAI-compatible endpoint."""

    kind: str = "portfolio"  # or "openai"
    base_url: str = ""
    model: str = OpenAIConfig.model
    style: str = "v2_cot"
    max_tokens: int = 8192

    def make(self) -> Generator:
        if self.kind == "portfolio":
            return PortfolioGenerator()
        if self.kind != "openai":
            raise ValueError(f"unknown generator {self.kind!r}; choose portfolio or openai")
        if not self.base_url.strip():
            raise ValueError("the OpenAI-compatible generator needs an endpoint URL (e.g. http://127.0.0.1:8000/v1)")
        if self.style not in STYLES:
            raise ValueError(f"unknown prompt style {self.style!r}; choose one of {STYLES}")
        few_shot = load_few_shot() if self.style == "v15_few_shot" else None
        config = OpenAIConfig(
            base_url=self.base_url.strip(),
            model=self.model,
            style=self.style,
            max_tokens=int(self.max_tokens),
            max_concurrency=1,
            retries=1,
        )
        return OpenAIGenerator(config, few_shot)


# --- the service -----------------------------------------------------------------------------------
class ProveService:
    """The tab's handlers over one checker (or none) shared by every browser session."""

    def __init__(self, checker: Checker | None, backend_text: str):
        self.checker = checker
        self.backend_text = backend_text  # description, or the setup message when checker is None
        self._problems: dict[str, dict[str, Problem]] = {}

    def close(self) -> None:
        if self.checker is not None:
            self.checker.backend.close()

    def backend_status(self) -> str:
        if self.checker is None:
            return "**No Lean backend configured: nothing can be verified.**\n\n```text\n" + self.backend_text + "\n```"
        return f"**Verifying with:** {self.backend_text}"

    def problems(self, variant: str) -> dict[str, Problem]:
        """miniF2F problems of a statement-set variant by name (loaded once)."""
        if variant not in self._problems:
            self._problems[variant] = {p.name: p for p in load_minif2f(variant)}
        return self._problems[variant]

    def statement(self, variant: str, name: str) -> str:
        """The text a selected problem is checked against (header, informal comment, statement)."""
        if not name:
            return ""
        p = self.problems(variant)[name]
        return p.header + p.informal_prefix + p.formal_statement

    def _problem(self, variant: str, name: str, code: str) -> Problem:
        """The selected miniF2F problem, else the theorem stated by the pasted code."""
        if name:
            problems = self.problems(variant)
            if name not in problems:
                raise ValueError(f"no problem named {name!r} in variant {variant}")
            return problems[name]
        if not code.strip():
            raise ValueError("Pick a miniF2F problem or paste a Lean 4 theorem.")
        return problem_from_text(code)

    def _not_configured(self, code: str = "", columns: list[str] | None = None, rows: list | None = None):
        return ProveReport(
            "not_verified",
            False,
            "Not verified: no Lean backend is configured",
            "```text\n" + self.backend_text + "\n```",
            code,
            columns or [],
            rows or [],
        )

    def verify(self, variant: str, name: str, code: str) -> ProveReport:
        """Check pasted code: a whole theorem, or (for a selected problem) just its tactic proof."""
        if not code.strip():
            return input_error("Paste a proof to verify.")
        try:
            problem = self._problem(variant, name, code)
        except ValueError as e:
            return input_error(str(e))
        mismatch = mismatch_error(problem, code)
        if mismatch:
            return input_error(mismatch)
        whole_file = bool(decl_pattern(problem.name).search(blank_comments_and_strings(code)))
        candidate = Candidate(code, "file") if whole_file else tactic_block(code)
        if self.checker is None:
            return self._not_configured()
        checked = self.checker.check(problem, candidate)
        return verdict_report(checked.verdict, checked.code, f"Verified: `{problem.name}` is proved")

    def prove(
        self, variant: str, name: str, code: str, choice: GeneratorChoice, attempts: int
    ) -> Iterator[ProveReport]:
        """Generate up to `attempts` candidates and check each; stops at the first verified one."""
        columns = ["attempt", "status", "reason"]
        try:
            problem = self._problem(variant, name, code)
            generator = choice.make()
        except ValueError as e:
            yield input_error(str(e))
            return
        if self.checker is None:
            yield self._not_configured()
            return
        rows: list[list[str]] = []
        for sample in range(int(attempts)):
            try:
                candidate = generator.generate(problem, sample)
            except GenerationError as e:
                rows.append([str(sample + 1), "generation_error", str(e)])
                yield ProveReport("generation_error", False, "The generator failed", str(e), "", columns, rows)
                return
            checked = self.checker.check(problem, candidate)
            verdict = checked.verdict
            rows.append([str(sample + 1), verdict.status.value, verdict.reason])
            if verdict.complete:
                report = verdict_report(verdict, checked.code, f"Verified: `{problem.name}` proved by {generator.name}")
                yield replace(report, columns=columns, rows=rows)
                return
            headline = f"Attempt {sample + 1}/{attempts}: {verdict.status.value}"
            yield ProveReport(
                verdict.status.value, False, headline, verdict_details(verdict), checked.code, columns, rows
            )
        yield ProveReport(
            "not_verified",
            False,
            f"No verified proof in {attempts} attempt(s)",
            f"Generator: {generator.name}",
            "",
            columns,
            rows,
        )

    def decompose(self, variant: str, name: str, code: str, strategy: str, attempts: int) -> Iterator[ProveReport]:
        """Split a V2 sketch into subgoal lemmas, solve them with the portfolio, stitch and re-verify.

        Yields progress after every check. The Lean work runs in a thread that stops before its next check
        once this generator is closed (the tab's Stop), so a cancelled run frees the REPL pool and never
        reports success.
        """
        if not code.strip():
            yield input_error("Paste a sketch: the theorem with `have ... := by sorry` steps.")
            return
        try:
            problem, goals = self._sketch(variant, name, code)
        except (ValueError, PinError) as e:  # DecompositionError is a ValueError
            yield input_error(f"Cannot decompose this sketch: {e}")
            return
        if self.checker is None:
            yield self._not_configured("", DECOMPOSE_COLUMNS, [_goal_row(g, "not checked") for g in goals])
            return
        ledger, stop = Ledger(), threading.Event()
        config = DecomposeConfig(strategy=strategy, attempts_per_lemma=int(attempts), max_depth=0)
        work = partial(
            prove_by_decomposition,
            problem,
            code,
            self.checker,
            PortfolioGenerator(),
            config,
            ledger,
            should_stop=stop.is_set,
        )
        run = _in_thread(work, f"decompose {problem.name}")
        try:
            start = shown = time.monotonic()
            seen = 0
            while not run.done():
                wait([run], timeout=_POLL_S)
                # Yield on progress, and at least every _HEARTBEAT_S: Gradio can close a generator only
                # between yields, and closing it is what stops the Lean work.
                if len(ledger.entries) > seen or time.monotonic() - shown >= _HEARTBEAT_S:
                    seen, shown = len(ledger.entries), time.monotonic()
                    yield _progress_report(goals, ledger, shown - start)
            stitched = run.result()
        except DecompositionError as e:
            yield input_error(f"Cannot decompose this sketch: {e}")
            return
        finally:
            stop.set()
        yield _decomposition_report(problem, goals, ledger, stitched)

    def _sketch(self, variant: str, name: str, code: str) -> tuple[Problem, list[Subgoal]]:
        """The problem a pasted sketch proves, and its subgoal lemmas (ValueError if it is not a sketch)."""
        problem = self._problem(variant, name, code)
        mismatch = mismatch_error(problem, code)
        if mismatch:
            raise ValueError(mismatch)
        return problem, subgoals(parse_sketch(code, problem.name), recursive=True)


DECOMPOSE_COLUMNS = ["lemma", "goal", "hypotheses", "result"]
_POLL_S = 0.05  # how often the decompose generator looks for new ledger entries
_HEARTBEAT_S = 1.0  # longest time between two progress reports, so Stop takes effect within about a second


def _in_thread(work: Callable[[], str | None], name: str) -> Future:
    """`work()` in a daemon thread, so the app can exit while a stopped run finishes its current check."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except Exception as e:  # handed to the caller through the future
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _goal_row(goal: Subgoal, result: str) -> list[str]:
    return [goal.lemma_name, goal.goal, " ".join(goal.binders), result]


def _progress_report(goals: list[Subgoal], ledger: Ledger, elapsed: float) -> ProveReport:
    """A running decomposition: each subgoal's state so far (never verified)."""
    rows = [_goal_row(g, _lemma_result(ledger, g.lemma_name)) for g in goals]
    headline = f"Decomposing: {len(ledger.entries)} check(s) in {elapsed:.0f} s"
    return ProveReport("running", False, headline, "", "", DECOMPOSE_COLUMNS, rows)


def _decomposition_report(problem: Problem, goals: list[Subgoal], ledger: Ledger, stitched: str | None) -> ProveReport:
    """The final report: verified only on the stitched file's complete (audited) verdict, else why not."""
    rows = [_goal_row(g, _lemma_result(ledger, g.lemma_name)) for g in goals]
    calls = f"{ledger.generator_calls} generator call(s), {len(ledger.entries)} ledger entries"
    verdict = ledger.final_verdict
    if stitched is not None and verdict is not None and verdict.complete:
        headline = f"Verified: `{problem.name}` proved from the sketch"
        return ProveReport(
            "complete", True, headline, f"{verdict_details(verdict)}\n\n{calls}", stitched, DECOMPOSE_COLUMNS, rows
        )
    if verdict is not None:  # every subgoal solved, but the stitched file did not verify
        headline = f"Not verified: the stitched proof is {verdict.status.value}"
        return ProveReport(
            verdict.status.value, False, headline, f"{verdict_details(verdict)}\n\n{calls}", "", DECOMPOSE_COLUMNS, rows
        )
    failed = next((row for row in rows if not row[3].startswith("complete")), None)
    headline = f"Not verified: subgoal `{failed[0]}` was not solved" if failed else "Not verified"
    reason = f"**Reason:** `{failed[3]}`\n\n" if failed else ""
    return ProveReport("not_verified", False, headline, reason + calls, "", DECOMPOSE_COLUMNS, rows)


def _lemma_result(ledger: Ledger, lemma: str) -> str:
    """The last thing the ledger records for a lemma ("not reached" if an earlier lemma failed)."""
    entries = [e for e in ledger.entries if e["target"] == lemma]
    if not entries:
        return "not reached"
    last = entries[-1]
    if last["kind"] == "lemma_check":
        ok = last["status"] == "ok"
        return "statement accepted, solving" if ok else f"statement rejected by Lean: {last['status']}"
    return f"{last['status']} after {sum(e['kind'] == 'lemma_attempt' for e in entries)} attempt(s)"
