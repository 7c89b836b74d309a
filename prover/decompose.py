"""DeepSeek-Prover-V2 subgoal decomposition: sketch -> standalone lemmas -> solve -> stitch -> re-verify.

A sketch is a theorem whose top-level tactic block is a chain of `have name : T := by sorry` steps
ending in a closing `sorry` (prover.md §2.1-2.2). Extraction is textual: steps other than `have`
are only allowed after the last hole, because a step such as `intro` changes the local context and
the lemma binders could no longer be read off the text.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .checker import Checker
from .dataset import Problem
from .generators import Generator
from .leantext import Signature, Step, binder_names, find_top_level, indent, parse_signature, top_level_steps
from .pinning import Candidate, PinError, decl_pattern, pin, proof_start
from .textguard import GuardPolicy, blank_comments_and_strings, scan
from .verdict import Status, Verdict

_HOLE = re.compile(r"(?:by\s+)?sorry")


class DecompositionError(ValueError):
    pass


class _Stopped(Exception):
    """`should_stop` said yes: unwinds every depth of a decomposition at once."""


def _is_hole(text: str) -> bool:
    """Whether a proof is only `sorry` (or `by sorry`), read with comments blanked: a note next to the hole
    must not hide it."""
    return _HOLE.fullmatch(blank_comments_and_strings(text).strip()) is not None


@dataclass(frozen=True)
class Have:
    name: str
    binders: list[str]
    type: str
    proof: str  # text after `:=`, stripped

    @property
    def hypothesis(self) -> str:
        typ = f"∀ {' '.join(self.binders)}, {self.type}" if self.binders else self.type
        return f"({self.name} : {typ})"


@dataclass(frozen=True)
class Subgoal:
    lemma_name: str
    binders: list[str]
    goal: str
    step: int  # index of the sketch step this hole sits in
    have: Have | None  # None for the closing `sorry`

    def statement(self) -> str:
        return f"theorem {self.lemma_name} {' '.join(self.binders)} :\n    {self.goal} := by\n"

    def call(self) -> str:
        args = [n for b in self.binders for n in binder_names(b)]
        return " ".join([self.lemma_name, *args])


@dataclass(frozen=True)
class Sketch:
    head: str  # everything up to and including the theorem's `:= by`
    signature: Signature
    steps: list[Step]
    base_indent: int
    haves: dict[int, Have]  # step index -> parsed have
    holes: list[int]  # step indices that are `sorry` holes (haves or the closing sorry)


def _signature(head: str) -> Signature:
    """parse_signature, with syntax it does not read (e.g. a destructuring `have ⟨x, hx⟩`) as a sketch error."""
    try:
        return parse_signature(head)
    except ValueError as e:
        raise DecompositionError(f"cannot read `{head.strip()[:60]}`: {e}") from e


def parse_have(text: str) -> Have | None:
    if not re.match(r"have(?![\w'])", text):
        return None
    assign = find_top_level(text, ":=")
    if assign < 0:
        raise DecompositionError(f"`have` without `:=`: {text[:80]!r}")
    head = blank_comments_and_strings(text[4:assign]).strip()  # comments must not leak into lemma types
    if head.startswith(":"):
        head = "this " + head
    sig = _signature(head)
    return Have(sig.name or "this", sig.binders, sig.type, text[assign + 2:].strip())


def parse_sketch(code: str, theorem: str, strict: bool = True) -> Sketch:
    """Split `theorem`'s tactic block into steps; strict: require holes and only `have`s before them."""
    blanked = blank_comments_and_strings(code)
    decl = decl_pattern(theorem).search(blanked)
    if decl is None:
        raise DecompositionError(f"`theorem {theorem}` not found in the sketch")
    start = proof_start(blanked, decl.start())
    assign = find_top_level(blanked, ":=", decl.start())
    signature = _signature(theorem + blanked[decl.end():assign])
    block = code[start:].rstrip()
    if block.startswith("\n"):
        block = block[1:]
    else:
        raise DecompositionError("the sketch's tactic block must start on the line after `:= by`")
    steps = top_level_steps(block)
    first = next(line for line in block.split("\n") if line.strip())
    base = len(first) - len(first.lstrip())
    haves, holes = {}, []
    for i, step in enumerate(steps):
        have = parse_have(step.text)
        if have is not None:
            haves[i] = have
            if _is_hole(have.proof):
                holes.append(i)
        elif _is_hole(step.text):
            holes.append(i)
    if strict and not holes:
        raise DecompositionError("the sketch has no `sorry` holes")
    for i, step in enumerate(steps[: holes[-1]] if strict else []):
        if i not in haves:
            raise DecompositionError(f"step {step.text.splitlines()[0]!r} before a hole changes the context; "
                                     "only `have` steps may precede holes")
    return Sketch(code[:start], signature, steps, base, haves, holes)


def _dedupe(binders: list[str]) -> list[str]:
    """Later hypotheses shadow earlier ones of the same name (the earlier one is inaccessible)."""
    seen, out = set(), []
    for b in reversed(binders):
        names = tuple(binder_names(b))
        if names and names in seen:
            continue
        seen.add(names)
        out.append(b)
    return out[::-1]


def subgoals(sketch: Sketch, recursive: bool = True) -> list[Subgoal]:
    """One lemma per hole. recursive=True adds every earlier `have` as a hypothesis (V2's variant b);
    False keeps only the theorem's binders (variant a). The closing sorry always gets every have."""
    name = sketch.signature.name
    out, counts = [], {}
    for i in sketch.holes:
        earlier = [sketch.haves[j].hypothesis for j in sorted(sketch.haves) if j < i]
        have = sketch.haves.get(i)
        if have is None:
            binders, goal, label = sketch.signature.binders + earlier, sketch.signature.type, "final"
        else:
            binders = sketch.signature.binders + (earlier if recursive else []) + have.binders
            goal, label = have.type, have.name
        counts[label] = counts.get(label, 0) + 1
        suffix = f"_{counts[label]}" if counts[label] > 1 else ""
        out.append(Subgoal(f"{name}_{label}{suffix}", _dedupe(binders), goal, i, have))
    return out


def lemma_body(code: str, lemma_name: str) -> str:
    """The proof of `lemma_name` in a checked file, dedented (what gets stitched back)."""
    blanked = blank_comments_and_strings(code)
    decl = decl_pattern(lemma_name).search(blanked)
    if decl is None:
        raise DecompositionError(f"`{lemma_name}` not in the solved file")
    start = proof_start(blanked, decl.start())
    nxt = re.compile(r"(?m)^(?:theorem|lemma)\s").search(blanked, start)
    steps = top_level_steps(code[start:nxt.start() if nxt else len(code)].strip("\n"))
    return "\n".join(s.text for s in steps)


def _assemble(sketch: Sketch, replacement: dict[int, str]) -> str:
    b = sketch.base_indent
    parts = []
    for i, step in enumerate(sketch.steps):
        text = replacement.get(i, step.text)
        parts.append(indent(text, b))
    return sketch.head + "\n" + "\n".join(parts) + "\n"


def _with_proof(sketch: Sketch, goal: Subgoal, proof: str) -> str:
    if goal.have is None:
        return proof
    head = sketch.steps[goal.step].text
    return head[: find_top_level(head, ":=")].rstrip() + " := by\n" + indent(proof, 2)


def stitch_inline(sketch: Sketch, goals: list[Subgoal], proofs: dict[str, str]) -> str:
    """Paste each lemma's proof into its hole (the lemma's hypotheses carry the context's names)."""
    return _assemble(sketch, {g.step: _with_proof(sketch, g, proofs[g.lemma_name]) for g in goals})


def stitch_aux(sketch: Sketch, goals: list[Subgoal], proofs: dict[str, str]) -> str:
    """Emit solved lemmas before the theorem and close each hole with `exact <lemma> <args>`."""
    lemmas = "".join(g.statement() + indent(proofs[g.lemma_name], 2) + "\n\n" for g in goals)
    body = _assemble(sketch, {g.step: _with_proof(sketch, g, f"exact {g.call()}") for g in goals})
    decl = decl_pattern(sketch.signature.name).search(blank_comments_and_strings(body))
    return body[: decl.start()] + lemmas + body[decl.start():]


def blank_haves(code: str, theorem: str) -> tuple[str, dict[str, str]]:
    """Turn a finished proof into a sketch: every `have ... := by <proof>` becomes `:= by sorry`.

    Returns the sketch and the removed proofs keyed by the lemma name `subgoals` will give them.
    """
    sketch = parse_sketch(code, theorem, strict=False)
    replaced, bodies, counts = {}, {}, {}
    for i, have in sketch.haves.items():
        if not have.proof.startswith("by") or _is_hole(have.proof):
            continue
        head = sketch.steps[i].text
        replaced[i] = head[: find_top_level(head, ":=")].rstrip() + " := by sorry"
        counts[have.name] = counts.get(have.name, 0) + 1
        suffix = f"_{counts[have.name]}" if counts[have.name] > 1 else ""
        body = have.proof[2:]
        bodies[f"{theorem}_{have.name}{suffix}"] = "\n".join(s.text for s in top_level_steps(body.strip("\n")))
    return _assemble(sketch, replaced), bodies


@dataclass
class Ledger:
    """Every call to a generator or to Lean made for one problem, so pass@k budgets stay honest."""

    entries: list[dict] = field(default_factory=list)
    final_verdict: Verdict | None = None  # of the top-level stitched file, once it was checked

    def record(self, kind: str, target: str, status: str, depth: int) -> None:
        self.entries.append({"kind": kind, "target": target, "status": status, "depth": depth})

    def count(self, kind: str) -> int:
        return sum(e["kind"] == kind for e in self.entries)

    @property
    def generator_calls(self) -> int:
        return self.count("sketch") + self.count("lemma_attempt")


@dataclass(frozen=True)
class DecomposeConfig:
    recursive: bool = True
    strategy: str = "inline"  # or "aux"
    attempts_per_lemma: int = 8
    max_depth: int = 1  # how many times a failed lemma may be sketched and decomposed again


def scan_sketch(problem: Problem, sketch_code: str, guard: GuardPolicy) -> None:
    """Refuse a sketch whose model-written text the text layer bans, its `sorry` holes aside.

    The lemma checks send the sketch's `have` types to Lean long before the stitched file is scanned, so
    the sketch must pass the same layer first. Its own statement too: the pin swaps in the reference
    statement, but `parse_sketch` reads the lemmas' binders and final goal from the sketch's.
    """
    try:
        authored = pin(problem, Candidate(sketch_code, "file")).authored
    except PinError as e:
        raise DecompositionError(f"sketch: {e}") from e
    blanked = blank_comments_and_strings(sketch_code)  # the pin refused text the lexer may misread
    decl = decl_pattern(problem.name).search(blanked)
    statement = sketch_code[decl.start():proof_start(blanked, decl.start())]
    findings = scan(authored + "\n" + statement, replace(guard, allowed=guard.allowed | {"sorry"}))
    if findings:
        raise DecompositionError(f"sketch refused by the text layer: {findings[0]}")


def _never() -> bool:
    """The default `should_stop`: batch runs and the CLI decompose to the end."""
    return False


def prove_by_decomposition(problem: Problem, sketch_code: str, checker: Checker, solver: Generator,
                           config: DecomposeConfig, ledger: Ledger, sketcher: Generator | None = None,
                           should_stop: Callable[[], bool] = _never) -> str | None:
    """The verified file for `problem` built from the sketch (as checked, header included), or None.

    Every step is in `ledger`. `should_stop` is asked before each generator call and Lean check, so a caller
    can cancel a long decomposition; once it says yes nothing more runs, the ledger gets a `stopped` entry
    and the result is None: a stopped decomposition never counts as proved.
    """
    try:
        return _decompose(problem, sketch_code, checker, solver, config, ledger, sketcher, 0, should_stop)
    except _Stopped:
        return None


def _check_stop(should_stop: Callable[[], bool], ledger: Ledger, target: str, depth: int) -> None:
    """A cancellation point: record where the run stopped and unwind, before any further work on `target`."""
    if should_stop():
        ledger.record("stopped", target, "stopped", depth)
        raise _Stopped


def _decompose(problem: Problem, sketch_code: str, checker: Checker, solver: Generator, config: DecomposeConfig,
               ledger: Ledger, sketcher: Generator | None, depth: int, should_stop: Callable[[], bool]) -> str | None:
    """prove_by_decomposition at `depth` (0: the user's sketch; deeper: a failed lemma sketched again)."""
    scan_sketch(problem, sketch_code, checker.config.guard)
    sketch = parse_sketch(sketch_code, problem.name)
    goals = subgoals(sketch, config.recursive)
    proofs: dict[str, str] = {}
    for goal in goals:
        lemma = Problem(goal.lemma_name, problem.split, problem.header, "", goal.statement())
        proof = _solve_lemma(lemma, checker, solver, config, ledger, depth, should_stop)
        if proof is None and sketcher is not None and depth < config.max_depth:
            _check_stop(should_stop, ledger, lemma.name, depth + 1)
            sub = sketcher.generate(lemma, 0)
            ledger.record("sketch", lemma.name, "generated", depth + 1)
            try:
                stitched = _decompose(lemma, sub.text, checker, solver, config, ledger, sketcher, depth + 1,
                                      should_stop)
            except DecompositionError as e:
                # The same sketch call as above, so a kind of its own: generator_calls stays one per call.
                ledger.record("sketch_unusable", lemma.name, str(e), depth + 1)
                stitched = None
            proof = lemma_body(stitched, lemma.name) if stitched else None
        if proof is None:
            return None
        proofs[goal.lemma_name] = proof
    stitch = stitch_aux if config.strategy == "aux" else stitch_inline
    _check_stop(should_stop, ledger, problem.name, depth)
    checked = checker.check(problem, Candidate(stitch(sketch, goals, proofs), "file"))
    ledger.record("stitch", problem.name, checked.verdict.status.value, depth)
    if depth == 0:
        ledger.final_verdict = checked.verdict
    return checked.code if checked.verdict.complete else None


def _solve_lemma(lemma: Problem, checker: Checker, solver: Generator, config: DecomposeConfig, ledger: Ledger,
                 depth: int, should_stop: Callable[[], bool]) -> str | None:
    """Check the lemma states something Lean accepts (exactly one sorry), then spend the attempt budget."""
    _check_stop(should_stop, ledger, lemma.name, depth)
    probe = checker.backend.verify(lemma.header + lemma.formal_statement + "  sorry\n", checker.config.timeout)
    well_formed = probe.status is Status.SORRY and len(probe.sorries) == 1 and not probe.errors
    ledger.record("lemma_check", lemma.name, probe.status.value if not well_formed else "ok", depth)
    if not well_formed:
        return None
    for attempt in range(config.attempts_per_lemma):
        _check_stop(should_stop, ledger, lemma.name, depth)
        checked = checker.check(lemma, solver.generate(lemma, attempt))
        ledger.record("lemma_attempt", lemma.name, checked.verdict.status.value, depth)
        if checked.verdict.complete:
            return lemma_body(checked.code, lemma.name)
    return None
