"""Lean REPL JSON protocol: request framing and typed responses (leanprover-community/repl).

Requests are one JSON object followed by a blank line; responses are pretty-printed JSON followed by
a blank line. List fields are omitted when empty, so every list here defaults to [].
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Union


class ProtocolError(ValueError):
    """The REPL printed something that is not a response of the protocol."""


@dataclass(frozen=True)
class Pos:
    line: int  # 1-based
    column: int  # 0-based, in code points

    @classmethod
    def parse(cls, d: dict | None) -> "Pos | None":
        return None if d is None else cls(int(d["line"]), int(d["column"]))

    def shifted(self, lines: int) -> "Pos":
        return Pos(self.line + lines, self.column)


@dataclass(frozen=True)
class Message:
    severity: str  # "info" | "warning" | "error" ("trace" exists in the type, never seen)
    data: str
    pos: Pos | None = None
    end_pos: Pos | None = None

    def shifted(self, lines: int) -> "Message":
        return Message(self.severity, self.data, _shift(self.pos, lines), _shift(self.end_pos, lines))

    def to_json(self) -> dict:
        return {"severity": self.severity, "data": self.data, "pos": _pos_json(self.pos),
                "endPos": _pos_json(self.end_pos)}


@dataclass(frozen=True)
class Sorry:
    goal: str
    proof_state: int | None = None
    pos: Pos | None = None  # omitted by the REPL for sorries reported from tactic mode
    end_pos: Pos | None = None

    def shifted(self, lines: int) -> "Sorry":
        return Sorry(self.goal, self.proof_state, _shift(self.pos, lines), _shift(self.end_pos, lines))

    def to_json(self) -> dict:
        return {"goal": self.goal, "proofState": self.proof_state, "pos": _pos_json(self.pos),
                "endPos": _pos_json(self.end_pos)}


@dataclass(frozen=True)
class CommandResponse:
    """Answer to {"cmd"|"path"|pickle...}; env is None when the server ran the command with gc."""

    env: int | None
    messages: list[Message] = field(default_factory=list)
    sorries: list[Sorry] = field(default_factory=list)
    tactics: list[dict] = field(default_factory=list)
    raw: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ProofStepResponse:
    proof_state: int
    goals: list[str]
    messages: list[Message] = field(default_factory=list)
    sorries: list[Sorry] = field(default_factory=list)
    proof_status: str | None = None  # absent in REPLs older than 2025 (e.g. the Lean 4.9 fork)
    raw: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorResponse:
    """{"message": ...}: unknown env/proof state, tactic parse errors, pickle errors."""

    message: str


Response = Union[CommandResponse, ProofStepResponse, ErrorResponse]


def _shift(p: Pos | None, lines: int) -> Pos | None:
    return None if p is None else p.shifted(lines)


def _pos_json(p: Pos | None) -> dict | None:
    return None if p is None else {"line": p.line, "column": p.column}


def encode_request(request: dict) -> bytes:
    """One request on the wire. json.dumps escapes newlines, so the payload has no blank line."""
    return (json.dumps(request, ensure_ascii=False) + "\n\n").encode("utf-8")


def _messages(d: dict) -> list[Message]:
    return [
        Message(m["severity"], m["data"], Pos.parse(m.get("pos")), Pos.parse(m.get("endPos")))
        for m in d.get("messages", [])
    ]


def _sorries(d: dict) -> list[Sorry]:
    return [
        Sorry(s["goal"], s.get("proofState"), Pos.parse(s.get("pos")), Pos.parse(s.get("endPos")))
        for s in d.get("sorries", [])
    ]


def parse_response(text: str) -> Response:
    """Parse one framed response; raises ProtocolError for anything the protocol cannot produce."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"REPL output is not JSON ({e}): {text[:200]!r}") from e
    return response_from_json(d)


def response_from_json(d: object) -> Response:
    """Typed response from an already decoded object (the Kimina server embeds them in its JSON)."""
    if not isinstance(d, dict):
        raise ProtocolError(f"REPL output is not a JSON object: {str(d)[:200]!r}")
    try:
        if set(d) == {"message"}:
            return ErrorResponse(str(d["message"]))
        if "proofState" in d and "goals" in d:
            return ProofStepResponse(int(d["proofState"]), list(d["goals"]), _messages(d), _sorries(d),
                                     d.get("proofStatus"), d)
        if "env" in d or "messages" in d or "sorries" in d or not d:
            env = d.get("env")
            return CommandResponse(None if env is None else int(env), _messages(d), _sorries(d),
                                   list(d.get("tactics", [])), d)
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed REPL response ({e!r}): {str(d)[:200]!r}") from e
    raise ProtocolError(f"unrecognised REPL response keys {sorted(d)}")


def split_frames(text: str) -> list[str]:
    """Split a stream into frames the way the REPL does: a frame ends at a whitespace-only line."""
    frames, current = [], []
    for line in text.splitlines(keepends=True):
        if line.strip():
            current.append(line)
        elif current:
            frames.append("".join(current))
            current = []
    if current:
        frames.append("".join(current))
    return frames
