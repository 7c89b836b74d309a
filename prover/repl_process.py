"""One persistent Lean REPL subprocess: framed JSON over pipes, wall timeout, memory cap, group kill."""
from __future__ import annotations

import os
import resource
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

from .repl_protocol import ProtocolError, Response, encode_request, parse_response

_STDERR_KEEP = 8192  # bytes of stderr kept for diagnostics; the rest is drained and dropped


class ReplTimeout(Exception):
    """No complete response before the deadline; the process group has been killed."""


class ReplDied(Exception):
    """The process exited or closed stdout before answering (crash, OOM abort, parse failure)."""


@dataclass(frozen=True)
class ProcessConfig:
    command: tuple[str, ...]
    cwd: str | None = None
    memory_limit_bytes: int | None = None  # RLIMIT_AS of the process and everything it spawns
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables


def _limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class ReplProcess:
    """Owns one REPL process in its own session, so a kill reaches `lake env` and its repl child."""

    def __init__(self, config: ProcessConfig):
        self.config = config
        env = {**os.environ, **dict(config.env)}
        limit = config.memory_limit_bytes
        try:
            self._proc = subprocess.Popen(
                list(config.command),
                cwd=config.cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=(lambda: _limit_memory(limit)) if limit else None,
            )
        except OSError as e:
            raise ReplDied(f"cannot start REPL {list(config.command)!r}: {e}") from e
        self._stdout_buf = b""
        self._stderr_tail = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._proc.stdout, selectors.EVENT_READ, "out")
        self._selector.register(self._proc.stderr, selectors.EVENT_READ, "err")
        self.uses = 0

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def stderr_tail(self) -> str:
        return self._stderr_tail.decode("utf-8", "replace")

    def alive(self) -> bool:
        return self._proc.poll() is None

    def request(self, payload: dict, timeout: float) -> Response:
        """Send one request and wait for its framed response, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        try:
            self._proc.stdin.write(encode_request(payload))
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            self.kill()
            raise ReplDied(f"REPL stdin closed: {e}; stderr: {self.stderr_tail[-500:]}") from e
        frame = self._read_frame(deadline, timeout)
        try:
            return parse_response(frame)
        except ProtocolError:
            self.kill()  # a process that prints garbage cannot be trusted with the next request
            raise

    def _read_frame(self, deadline: float, timeout: float) -> str:
        while True:
            frame = self._take_frame()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise ReplTimeout(f"no REPL response within {timeout:g} s")
            events = self._selector.select(remaining)
            for key, _ in events:
                chunk = os.read(key.fileobj.fileno(), 65536)
                if key.data == "err":
                    if chunk:
                        self._stderr_tail = (self._stderr_tail + chunk)[-_STDERR_KEEP:]
                    else:
                        self._selector.unregister(key.fileobj)
                elif chunk:
                    self._stdout_buf += chunk
                else:
                    self._drain_stderr()
                    code = self._proc.wait()
                    self.kill()
                    raise ReplDied(f"REPL exited with code {code} before answering; "
                                   f"stderr: {self.stderr_tail[-500:]!r}")

    def _take_frame(self) -> str | None:
        """Pop text up to the first whitespace-only line, skipping leading blank lines."""
        lines = self._stdout_buf.split(b"\n")
        body: list[bytes] = []
        consumed = 0
        for line in lines[:-1]:  # the last element is an unterminated line still being written
            consumed += len(line) + 1
            if line.strip():
                body.append(line)
            elif body:
                self._stdout_buf = self._stdout_buf[consumed:]
                return b"\n".join(body).decode("utf-8", "replace")
        return None

    def _drain_stderr(self) -> None:
        for key in list(self._selector.get_map().values()):
            if key.data == "err":
                try:
                    while chunk := os.read(key.fileobj.fileno(), 65536):
                        self._stderr_tail = (self._stderr_tail + chunk)[-_STDERR_KEEP:]
                except OSError:
                    pass

    def kill(self) -> None:
        """SIGKILL the whole process group (the REPL and anything it spawned) and reap it."""
        if self._proc.returncode is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        else:
            try:  # the leader is gone, but children it left in the group may survive it
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._close_pipes()

    def close(self) -> None:
        """Graceful end: EOF on stdin makes a REPL exit; kill if it does not within a second."""
        if self._proc.returncode is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=1.0)
            except (subprocess.TimeoutExpired, OSError):
                pass
        self.kill()

    def _close_pipes(self) -> None:
        try:
            self._selector.close()
        except (OSError, ValueError, KeyError):
            pass
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
