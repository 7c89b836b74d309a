"""Verdicts: what a backend saw, classified the same way for every backend."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum

from .repl_protocol import CommandResponse, ErrorResponse, Message, Response, Sorry

# Lean <= 4.27 quotes with apostrophes, >= 4.28 with backticks; a check for one spelling passes the other.
SORRY_WARNINGS = ("declaration uses 'sorry'", "declaration uses `sorry`")
ALLOWED_AXIOMS = frozenset({"propext", "Classical.choice", "Quot.sound"})


class Status(str, Enum):
    COMPLETE = "complete"
    SORRY = "sorry"
    LEAN_ERROR = "lean_error"
    TIMEOUT = "timeout"
    REPL_ERROR = "repl_error"  # the REPL answered {"message": ...}
    SYSTEM_ERROR = "system_error"  # the process died or printed unreadable output while checking this proof
    UNAVAILABLE = "unavailable"  # the verifier could not be used at all: no REPL, failed import header, no server
    REJECTED = "rejected"  # a defence (text layer, statement pin, axiom audit) refused it


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str = ""
    messages: list[Message] = field(default_factory=list)
    sorries: list[Sorry] = field(default_factory=list)
    axioms: list[str] | None = None  # None: no audit output was obtained
    time_s: float = 0.0
    stderr: str = ""

    @property
    def complete(self) -> bool:
        return self.status is Status.COMPLETE

    @property
    def errors(self) -> list[Message]:
        return [m for m in self.messages if m.severity == "error"]

    def with_time(self, seconds: float) -> "Verdict":
        return replace(self, time_s=seconds)

    def to_json(self) -> dict:
        return {
            "status": self.status.value,
            "reason": self.reason,
            "messages": [m.to_json() for m in self.messages],
            "sorries": [s.to_json() for s in self.sorries],
            "axioms": self.axioms,
            "time_s": round(self.time_s, 4),
            "stderr": self.stderr,
        }


def is_sorry_warning(m: Message) -> bool:
    return m.severity == "warning" and any(w in m.data for w in SORRY_WARNINGS)


def classify(response: Response) -> Verdict:
    """Status of one command response. Info messages never fail a proof."""
    if isinstance(response, ErrorResponse):
        return Verdict(Status.REPL_ERROR, response.message)
    if not isinstance(response, CommandResponse):
        return Verdict(Status.REPL_ERROR, f"expected a command response, got {type(response).__name__}")
    msgs, sorries = response.messages, response.sorries
    errors = [m for m in msgs if m.severity == "error"]
    if errors:
        return Verdict(Status.LEAN_ERROR, errors[0].data.splitlines()[0], msgs, sorries)
    if sorries or any(is_sorry_warning(m) for m in msgs):
        return Verdict(Status.SORRY, "proof contains sorry", msgs, sorries)
    # The V1.5/Goedel criterion also fails on any warning mentioning "failed".
    failed = [m for m in msgs if m.severity == "warning" and "failed" in m.data]
    if failed:
        return Verdict(Status.LEAN_ERROR, failed[0].data.splitlines()[0], msgs, sorries)
    return Verdict(Status.COMPLETE, "", msgs, sorries)


_AXIOMS_RE = re.compile(r"'(?P<name>[^']+)' depends on axioms: \[(?P<axioms>[^\]]*)\]", re.S)
_NO_AXIOMS_RE = re.compile(r"'(?P<name>[^']+)' does not depend on any axioms")


def parse_axioms(messages: list[Message], name: str) -> list[str] | None:
    """Axioms listed by `#print axioms name`; None when that output is absent (audit fails closed)."""
    for m in messages:
        if m.severity != "info":
            continue
        hit = _AXIOMS_RE.search(m.data)
        if hit and hit["name"] == name:
            return [a.strip() for a in hit["axioms"].split(",") if a.strip()]
        hit = _NO_AXIOMS_RE.search(m.data)
        if hit and hit["name"] == name:
            return []
    return None


def audit_command(name: str) -> str:
    return f"#print axioms {name}"
