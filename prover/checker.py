"""The full verification stack: pin the statement, text layer, Lean backend, axiom audit."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Protocol

from .dataset import Problem
from .leantext import split_header
from .pinning import Candidate, PinError, pin
from .textguard import GuardPolicy, scan
from .verdict import ALLOWED_AXIOMS, Status, Verdict


class Backend(Protocol):
    """Anything that can check a whole Lean file and, if complete, audit `theorem`'s axioms."""

    def verify(self, code: str, timeout: float, theorem: str | None = None) -> Verdict: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CheckConfig:
    timeout: float = 300.0
    guard: GuardPolicy = field(default_factory=GuardPolicy)
    allowed_axioms: frozenset[str] = ALLOWED_AXIOMS
    require_audit: bool = True  # no audit output => not complete (fail closed)


@dataclass(frozen=True)
class Checked:
    code: str  # the file that was (or would have been) verified
    verdict: Verdict


def audit_verdict(verdict: Verdict, config: CheckConfig) -> Verdict:
    """Downgrade a complete verdict whose axioms are missing or outside the whitelist."""
    if not verdict.complete or not config.require_audit:
        return verdict
    if verdict.axioms is None:
        return replace(verdict, status=Status.REJECTED, reason="audit: no `#print axioms` output (fail closed)")
    extra = sorted(set(verdict.axioms) - config.allowed_axioms)
    if extra:
        return replace(verdict, status=Status.REJECTED, reason=f"audit: uses axioms {extra}")
    return verdict


class Checker:
    def __init__(self, backend: Backend, config: CheckConfig = CheckConfig()):
        self.backend = backend
        self.config = config

    def check(self, problem: Problem, candidate: Candidate) -> Checked:
        start = time.monotonic()
        try:
            pinned = pin(problem, candidate)
        except PinError as e:
            return Checked("", Verdict(Status.REJECTED, f"pin: {e}"))
        return Checked(pinned.code, self.check_scanned(pinned.authored, pinned.code, problem.name, start))

    def check_unpinned(self, code: str, theorem: str) -> Verdict:
        """A file with no reference statement: everything after its import lines is scanned as model-written.

        The imports choose the environment (Lean allows nothing else there); scanning them would refuse
        `import Mathlib.Tactic` for naming the meta API.
        """
        _, body, _ = split_header(code)
        return self.check_scanned(body, code, theorem, time.monotonic())

    def check_scanned(self, authored: str, code: str, theorem: str, start: float) -> Verdict:
        """Text layer over `authored`, then Lean and the audit of `theorem` in `code`."""
        findings = scan(authored, self.config.guard)
        if findings:
            return Verdict(Status.REJECTED, f"text: {findings[0]}", time_s=time.monotonic() - start)
        return self.check_code(code, theorem)

    def check_code(self, code: str, theorem: str) -> Verdict:
        """Backend + audit for an already pinned and scanned file (used by stitching too)."""
        verdict = self.backend.verify(code, self.config.timeout, theorem=theorem)
        return audit_verdict(verdict, self.config)
