"""Pool of persistent REPL processes: the import header runs once per process, bodies reuse its env."""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, replace

from .leantext import split_header
from .repl_process import ProcessConfig, ReplDied, ReplProcess, ReplTimeout
from .repl_protocol import CommandResponse, ErrorResponse, ProtocolError
from .verdict import Status, Verdict, audit_command, classify, parse_axioms


@dataclass(frozen=True)
class PoolConfig:
    process: ProcessConfig
    workers: int = 2
    max_uses: int | None = None  # recycle a process after this many proofs (Lean REPLs grow and leak)
    header_timeout: float = 600.0  # importing Mathlib takes tens of seconds on a cold cache
    audit_timeout: float = 60.0


def _header_key(header: str) -> str:
    """The import lines of a header, one per line with blank lines dropped: headers that differ only in
    layout import the same environment, so they share a process instead of re-importing Mathlib."""
    return "\n".join(line.strip() for line in header.split("\n") if line.strip())


class _Slot:
    """A worker position in the pool; its process is (re)started lazily."""

    def __init__(self) -> None:
        self.proc: ReplProcess | None = None
        self.header: str | None = None  # _header_key of the header its env was built from
        self.header_env: int | None = None

    def reset(self) -> None:
        if self.proc is not None:
            self.proc.kill()
        self.proc, self.header, self.header_env = None, None, None


class ReplPool:
    """Thread-safe: up to `workers` verifications run at once, one per process."""

    def __init__(self, config: PoolConfig):
        if config.workers < 1:
            raise ValueError("workers must be >= 1")
        self.config = config
        self._free = [_Slot() for _ in range(config.workers)]
        self._cond = threading.Condition()
        self._closed = False
        self.restarts = 0  # processes started, for diagnostics and tests

    def _acquire(self, header: str) -> _Slot:
        with self._cond:
            while not self._free:
                if self._closed:
                    raise RuntimeError("pool is closed")
                self._cond.wait()
            if self._closed:
                raise RuntimeError("pool is closed")
            match = [s for s in self._free if s.header == header and s.proc is not None]
            slot = match[0] if match else self._free[0]
            self._free.remove(slot)
            return slot

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            if self._closed:
                slot.reset()
            self._free.append(slot)
            self._cond.notify()

    def _ensure_started(self, slot: _Slot, header: str) -> Verdict | None:
        """Start the slot's process and run the header; a Verdict means the header could not run."""
        if slot.proc is not None and slot.proc.alive() and slot.header == header:
            return None
        slot.reset()
        try:
            proc = ReplProcess(self.config.process)
        except ReplDied as e:
            return Verdict(Status.UNAVAILABLE, f"REPL did not start: {e}")
        self.restarts += 1
        try:
            resp = proc.request({"cmd": header}, self.config.header_timeout)
        except (ReplTimeout, ReplDied, ProtocolError) as e:
            stderr = proc.stderr_tail
            proc.kill()
            return Verdict(Status.UNAVAILABLE, f"import header failed: {e}", stderr=stderr)
        head = classify(resp)
        if head.status is not Status.COMPLETE or resp.env is None:
            proc.kill()
            reason = f"{head.status.value}: {head.reason}" if head.status is not Status.COMPLETE else "no env id"
            return Verdict(Status.UNAVAILABLE, f"import header failed ({reason})", head.messages)
        slot.proc, slot.header, slot.header_env = proc, header, resp.env
        return None

    def verify(self, code: str, timeout: float, theorem: str | None = None) -> Verdict:
        """Check `code`; when it is complete and `theorem` is given, audit its axioms in the same env."""
        start = time.monotonic()
        header, body, shift = split_header(code)
        header = _header_key(header)  # `shift` still counts this file's own header lines
        slot = self._acquire(header)
        try:
            verdict = self._verify_in(slot, header, body, shift, timeout, theorem)
        finally:
            self._release(slot)
        return verdict.with_time(time.monotonic() - start)

    def _verify_in(self, slot: _Slot, header: str, body: str, shift: int, timeout: float,
                   theorem: str | None) -> Verdict:
        failed = self._ensure_started(slot, header)
        if failed is not None:
            slot.reset()
            return failed
        proc = slot.proc
        try:
            resp = proc.request({"cmd": body, "env": slot.header_env}, timeout)
        except ReplTimeout as e:
            stderr = proc.stderr_tail
            slot.reset()
            return Verdict(Status.TIMEOUT, str(e), stderr=stderr)
        except (ReplDied, ProtocolError) as e:
            stderr = proc.stderr_tail
            slot.reset()
            return Verdict(Status.SYSTEM_ERROR, str(e), stderr=stderr)
        verdict = classify(resp)
        verdict = replace(verdict, messages=[m.shifted(shift) for m in verdict.messages],
                          sorries=[s.shifted(shift) for s in verdict.sorries], stderr=proc.stderr_tail)
        if isinstance(resp, ErrorResponse):
            slot.reset()  # a REPL that lost its header env cannot serve the next proof
            return verdict
        if verdict.complete and theorem is not None:
            verdict = replace(verdict, axioms=self._audit(slot, resp, theorem))
            if verdict.axioms is not None and not self._in_step(slot):
                slot.reset()
                return Verdict(Status.SYSTEM_ERROR, "REPL output out of step after the audit: the frames read "
                               "were not the answers to our commands (did the proof print to stdout?)")
        proc.uses += 1
        if slot.proc is not None and self.config.max_uses and proc.uses >= self.config.max_uses:
            slot.reset()
        return verdict

    def _audit(self, slot: _Slot, resp: CommandResponse, theorem: str) -> list[str] | None:
        """`#print axioms` as its own command in the proof's env, so nothing in the proof can skip it."""
        if resp.env is None:
            return None
        try:
            audit = slot.proc.request({"cmd": audit_command(theorem), "env": resp.env},
                                      self.config.audit_timeout)
        except (ReplTimeout, ReplDied, ProtocolError):
            slot.reset()
            return None
        if not isinstance(audit, CommandResponse):
            return None
        return parse_axioms(audit.messages, theorem)

    def _in_step(self, slot: _Slot) -> bool:
        """Whether the next frame answers a command sent now, carrying a nonce the proof could not know.

        Code that runs while a proof elaborates could print frames that look like a clean answer and a
        clean audit. They would be read in place of the real answers, which would still be waiting; the
        echo of a fresh nonce as the very next frame shows that nothing was injected.
        """
        nonce = secrets.token_hex(12)
        try:
            resp = slot.proc.request({"cmd": f'#print "{nonce}"', "env": slot.header_env},
                                     self.config.audit_timeout)
        except (ReplTimeout, ReplDied, ProtocolError):
            return False
        return isinstance(resp, CommandResponse) and any(nonce in m.data for m in resp.messages)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for slot in self._free:
                slot.reset()
            self._cond.notify_all()

    def __enter__(self) -> "ReplPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
