"""Resumable batch proving: every (problem, sample) is attempted once, logged once, summarised by category."""
from __future__ import annotations

import fcntl
import hashlib
import json
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from .attempts import AttemptLog
from .checker import CheckConfig, Checker
from .dataset import Problem
from .decompose import (DecomposeConfig, DecompositionError, Ledger, parse_sketch, prove_by_decomposition,
                        scan_sketch, subgoals)
from .generators import GenerationError, Generator
from .pinning import Candidate, PinError, pin
from .passk import summarize
from .report import write_report
from .textguard import GuardPolicy
from .verdict import Status, Verdict


@dataclass(frozen=True)
class RunSpec:
    """What makes two runs the same run; a resume with a different spec is refused."""

    variant: str
    split: str
    statement_digest: str
    generator: str
    samples: int
    problems: tuple[str, ...]
    backend: dict  # where the backend runs (command, URL, workers): recorded, free to change on resume
    verification: dict  # what counts as verified (verification_settings): must match on resume
    decompose: dict | None = None  # Decomposition.to_json() when sketches are decomposed

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["problems"] = list(self.problems)
        return d


def verification_settings(backend_kind: str, config: CheckConfig) -> dict:
    """The settings that decide a verdict; two runs that differ in them must not share a pass@k table."""
    return {"backend": backend_kind, "timeout": config.timeout, "allowed_rules": sorted(config.guard.allowed),
            "allowed_axioms": sorted(config.allowed_axioms), "require_audit": config.require_audit}


def _check_manifest(out: Path, spec: RunSpec) -> None:
    path = out / "manifest.json"
    want = spec.to_json()
    if path.exists():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or move it") from e
        keys = ("variant", "split", "statement_digest", "generator", "problems", "verification", "decompose")
        diff = [k for k in keys if have.get(k) != want[k]]
        if diff:
            detail = "; ".join(f"{k}: run has {have.get(k)!r}, now {want[k]!r}" for k in diff if k != "problems")
            raise ValueError(f"{out} holds a different run (differs in {diff}{': ' + detail if detail else ''}); "
                             "use another --out")
        if have.get("samples", 0) < spec.samples:  # asking for more samples extends the run
            path.write_text(json.dumps(want, indent=1, ensure_ascii=False))
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=1, ensure_ascii=False))


@dataclass(frozen=True)
class Decomposition:
    """Batch mode of DeepSeek-Prover-V2 (prover.md §2.1): a sample whose proof is a sketch with
    `have ... := by sorry` holes has its holes solved by `solver` and is stitched and re-verified.

    One sample stays one pass@k draw; the record says how many extra generator and Lean calls it took.
    """

    solver: Generator
    config: DecomposeConfig

    def to_json(self) -> dict:
        return {"solver": self.solver.name, **asdict(self.config)}


def _record(problem: Problem, sample: int, generator: Generator, code: str, v: Verdict) -> dict:
    return {
        "problem": problem.name,
        "sample": sample,
        "category": problem.category,
        "generator": generator.name,
        "status": v.status.value,
        "reason": v.reason,
        "time_s": round(v.time_s, 4),
        "code_sha256": hashlib.sha256(code.encode()).hexdigest(),
        "code": code,
        "axioms": v.axioms,
        "errors": [m.to_json() for m in v.errors][:5],
    }


def _sketch(problem: Problem, candidate: Candidate, guard: GuardPolicy) -> tuple[str, int] | None:
    """(whole file, number of holes) if the candidate is a decomposable sketch, else None (it is then checked
    as an ordinary proof, so a sketch the text layer refuses is recorded as rejected)."""
    try:
        code = pin(problem, candidate).code
        scan_sketch(problem, code, guard)
        holes = len(subgoals(parse_sketch(code, problem.name)))
    except (PinError, DecompositionError):
        return None
    return code, holes


def _attempt(problem: Problem, sample: int, generator: Generator, checker: Checker,
             decomposition: Decomposition | None = None) -> dict:
    candidate = generator.generate(problem, sample)
    parsed = _sketch(problem, candidate, checker.config.guard) if decomposition else None
    if parsed is None:
        checked = checker.check(problem, candidate)
        return _record(problem, sample, generator, checked.code or candidate.text, checked.verdict)
    sketch, holes = parsed
    ledger = Ledger()
    stitched = prove_by_decomposition(problem, sketch, checker, decomposition.solver, decomposition.config, ledger)
    unavailable = [e for e in ledger.entries if e["status"] == Status.UNAVAILABLE.value]
    if unavailable:  # not a verdict on this sample: left to do like any unavailable check
        return _record(problem, sample, generator, sketch,
                       Verdict(Status.UNAVAILABLE, f"during decomposition ({unavailable[0]['kind']})"))
    if stitched is not None:
        record = _record(problem, sample, generator, stitched, ledger.final_verdict)
    elif ledger.final_verdict is not None:  # every subgoal solved, but the stitched file did not verify
        v = ledger.final_verdict
        record = _record(problem, sample, generator, sketch, replace(v, reason=f"stitched file: {v.reason}"))
    else:  # a subgoal stayed unsolved, so the sketch keeps a hole (the rest are not tried)
        tried = ledger.count("lemma_check")
        reason = f"decomposition: subgoal {tried} of {holes} was not solved"
        record = _record(problem, sample, generator, sketch, Verdict(Status.SORRY, reason))
    record["decomposition"] = {
        "generator_calls": 1 + ledger.generator_calls,  # the sketch itself, then every subgoal attempt
        "checks": len(ledger.entries),  # lemma checks, subgoal attempts (some refused before Lean), stitch
        "subgoals": holes,
        "subgoals_tried": ledger.count("lemma_check"),
    }
    return record


class VerifierUnavailable(ValueError):
    """The Lean backend could not be used at all, several times in a row: stop rather than log failures."""


UNAVAILABLE_IN_A_ROW = 3  # verdicts of status `unavailable` with no logged attempt between them stop the run


def run_batch(problems: list[Problem], generator: Generator, checker: Checker, spec: RunSpec, out: Path,
              workers: int, decomposition: Decomposition | None = None) -> dict:
    """Attempt every missing (problem, sample), appending each result as it lands; returns the summary.

    Only verdicts about a proof are logged. A failed generation or an unavailable verifier (no REPL, failed
    import header, unreachable server) leaves the unit to do, so a rerun retries it; several unavailable
    verdicts in a row stop the run instead of marking every remaining unit as failed.
    """
    with _exclusive(out):
        return _run_batch(problems, generator, checker, spec, out, workers, decomposition)


@contextmanager
def _exclusive(out: Path):
    """Hold an advisory lock on the run directory: two runs appending to one log would duplicate records."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ValueError(f"another run is writing to {out}; wait for it or use another --out") from e
        yield


def _run_batch(problems: list[Problem], generator: Generator, checker: Checker, spec: RunSpec, out: Path,
               workers: int, decomposition: Decomposition | None) -> dict:
    _check_manifest(out, spec)
    log = AttemptLog(out / "attempts.jsonl")
    done = log.load()
    todo = [(p, s) for s in range(spec.samples) for p in problems if (p.name, s) not in done]
    skipped: list[str] = []
    unavailable_in_a_row = 0
    bar = tqdm(total=len(todo), desc="proving", unit="attempt", file=sys.stderr, mininterval=1.0)
    pending: dict[Future, tuple[Problem, int]] = {}

    def land(fut: Future) -> None:
        nonlocal unavailable_in_a_row
        problem, sample = pending.pop(fut)
        try:
            record = fut.result()
        except GenerationError as e:
            skipped.append(f"{problem.name}#{sample}: generation failed: {e}")
            return
        if record["status"] == Status.UNAVAILABLE.value:
            skipped.append(f"{problem.name}#{sample}: verifier unavailable: {record['reason']}")
            unavailable_in_a_row += 1
            if unavailable_in_a_row >= UNAVAILABLE_IN_A_ROW:
                raise VerifierUnavailable(
                    f"the Lean backend was unavailable {unavailable_in_a_row} times in a row "
                    f"({record['reason']}); nothing was logged for those units. Fix the backend and rerun the "
                    f"same command to resume ({len(done)} attempts are saved in {log.path})")
            return
        unavailable_in_a_row = 0
        log.append(record)
        done[(problem.name, sample)] = record
        bar.update(1)
        bar.set_postfix(solved=len({k[0] for k, r in done.items() if r["status"] == "complete"}))

    queue = iter(todo)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        while True:
            while len(pending) < 2 * workers and (unit := next(queue, None)) is not None:
                pending[pool.submit(_attempt, unit[0], unit[1], generator, checker, decomposition)] = unit
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                land(fut)
    except VerifierUnavailable:
        _finish_running(pending, land, "stopping")
        raise
    except KeyboardInterrupt:
        _finish_running(pending, land, "interrupted")
        bar.close()
        print(f"\ninterrupted; {len(done)} attempts are saved in {log.path}. "
              "Rerun the same command to resume.", file=sys.stderr)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    if skipped:
        print(f"{len(skipped)} units were not attempted and stay to do (rerun to retry):\n  "
              + "\n  ".join(skipped[:10]), file=sys.stderr)
    return finish(out, problems, done, spec.samples)


def _finish_running(pending: dict[Future, tuple[Problem, int]], land, why: str) -> None:
    """When the run stops early: drop queued units, but log the ones already running when they end (Ctrl-C
    drops those too), so work that finishes is not thrown away."""
    running = [fut for fut in list(pending) if not fut.cancel()]
    for fut in set(pending) - set(running):
        pending.pop(fut)
    if not running:
        return
    print(f"\n{why}; waiting for {len(running)} running attempt(s) to finish so they are saved "
          "(Ctrl-C to drop them)", file=sys.stderr)
    try:
        for fut in as_completed(running):
            try:
                land(fut)
            except VerifierUnavailable:
                return
    except KeyboardInterrupt:
        return


def finish(out: Path, problems: list[Problem], done: dict[tuple[str, int], dict], samples: int) -> dict:
    outcomes: dict[str, dict[int, bool]] = {p.name: {} for p in problems}
    for (name, sample), rec in done.items():
        if name in outcomes and sample < samples:
            outcomes[name][sample] = rec["status"] == "complete"
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if k <= samples]
    if samples not in ks:
        ks.append(samples)
    table = summarize(outcomes, {p.name: p.category for p in problems}, ks)
    summary = {"samples": samples, "ks": ks, "table": table,
               "complete_runs": sum(len(o) == samples for o in outcomes.values()),
               "statuses": _count(r["status"] for r in done.values())}
    write_report(out, summary)
    return summary


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return dict(sorted(counts.items()))
