"""Client backend for a Kimina Lean Server (`POST /api/check`), for verification on other machines.

The server keeps its own REPL pool, so an axiom audit cannot run as a separate command in the proof's
environment; it is appended as the file's last command and only messages on that appended line count
as audit output. A proof that stops elaboration early (`#exit`) therefore yields no audit output and
fails closed.
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

from .repl_protocol import CommandResponse, ErrorResponse, ProtocolError, response_from_json
from .verdict import Status, Verdict, audit_command, classify, parse_axioms


@dataclass(frozen=True)
class KiminaConfig:
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    retries: int = 3  # for 429 (no free REPL) and 5xx answers and refused connections
    backoff_s: float = 1.0
    http_margin_s: float = 30.0  # added to the Lean timeout for the HTTP round trip


class KiminaUnreachable(OSError):
    """No answer after every retry (refused connections, 429 or 5xx): the server, not the proof, is at fault."""


class KiminaBackend:
    def __init__(self, config: KiminaConfig):
        self.config = config

    def verify(self, code: str, timeout: float, theorem: str | None = None) -> Verdict:
        start = time.monotonic()
        audit_line = code.count("\n") + 3 if theorem else None
        snippet = code + f"\n\n{audit_command(theorem)}\n" if theorem else code
        payload = {"snippets": [{"id": "0", "code": snippet}], "timeout": max(1, math.ceil(timeout)),
                   "reuse": True}
        try:
            reply = self._post("/api/check", payload, timeout + self.config.http_margin_s)
            verdict = self._verdict(reply, theorem, audit_line)
        except (ProtocolError, KeyError, IndexError, TypeError, ValueError) as e:
            verdict = Verdict(Status.SYSTEM_ERROR, f"malformed Kimina reply: {e}")
        except KiminaUnreachable as e:
            verdict = Verdict(Status.UNAVAILABLE, f"Kimina server {self.config.url} unreachable: {e}")
        except OSError as e:  # it answered, but refused this request
            verdict = Verdict(Status.SYSTEM_ERROR, f"Kimina server {self.config.url} refused the request: {e}")
        return verdict.with_time(time.monotonic() - start)

    def _post(self, path: str, payload: dict, timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        data = json.dumps(payload, ensure_ascii=False).encode()
        for attempt in range(self.config.retries + 1):
            req = urllib.request.Request(self.config.url.rstrip("/") + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                busy = e.code == 429 or e.code >= 500
                if not busy:
                    raise OSError(f"HTTP {e.code}: {e.read()[:200]!r}") from e
                if attempt == self.config.retries:
                    raise KiminaUnreachable(f"HTTP {e.code} after {attempt + 1} tries: {e.read()[:200]!r}") from e
            except urllib.error.URLError as e:
                if attempt == self.config.retries:
                    raise KiminaUnreachable(f"{e.reason} after {attempt + 1} tries") from e
            time.sleep(self.config.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def _verdict(reply: dict, theorem: str | None, audit_line: int | None) -> Verdict:
        result = reply["results"][0]
        if result.get("error"):
            status = Status.TIMEOUT if "timed out" in result["error"] else Status.SYSTEM_ERROR
            return Verdict(status, result["error"])
        resp = response_from_json(result["response"])
        if isinstance(resp, ErrorResponse) or not isinstance(resp, CommandResponse):
            return classify(resp)
        audit = [m for m in resp.messages if m.pos is not None and m.pos.line >= audit_line] if theorem else []
        proof = replace(resp, messages=[m for m in resp.messages if m not in audit])
        verdict = classify(proof)
        if verdict.complete and theorem:
            verdict = replace(verdict, axioms=parse_axioms(audit, theorem))
        return verdict

    def close(self) -> None:
        """Nothing to release: every call is a separate HTTP request."""
