"""One persistent Lean REPL subprocess: framed JSON over pipes, wall timeout, memory cap, group kill."""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .repl_protocol import ProtocolError, Response, encode_request, parse_response

_STDERR_KEEP = 8192  # bytes of stderr kept for diagnostics; the rest is drained and dropped
_EXIT_GRACE_S = 1.0  # a REPL that closed stdout normally exits at once; one that lingers is killed
_DRAIN_S = 0.5  # how long to collect the last stderr of a dead process group
_LIMIT_WRAPPER = """\
import os, resource, sys
try:
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
    os.execvp(sys.argv[2], sys.argv[2:])
except (OSError, ValueError) as e:
    sys.stderr.write(f"cannot start REPL {sys.argv[2:]!r}: {e}\\n")
    sys.exit(127)
"""


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


def _launch_argv(config: ProcessConfig) -> list[str]:
    """The command, behind a tiny Python that sets RLIMIT_AS and execs it when a limit is asked for.

    `preexec_fn` could set the limit in the forked child, but Python documents it as unsafe while
    other threads run, and the pool starts REPLs from worker threads. exec keeps the pid, so the
    session, the group kill and the exit code are still the REPL's own.
    """
    if not config.memory_limit_bytes:
        return list(config.command)
    return [sys.executable, "-I", "-c", _LIMIT_WRAPPER, str(config.memory_limit_bytes), *config.command]


class ReplProcess:
    """Owns one REPL process in its own session, so a kill reaches `lake env` and its repl child."""

    def __init__(self, config: ProcessConfig):
        self.config = config
        env = {**os.environ, **dict(config.env)}
        try:
            self._proc = subprocess.Popen(
                _launch_argv(config),
                cwd=config.cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
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
            raise self._died(f"REPL stdin closed ({e})") from e
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
            for key, _ in self._selector.select(remaining):
                if key.data == "err":
                    self._read_stderr(key)
                elif chunk := os.read(key.fileobj.fileno(), 65536):
                    self._stdout_buf += chunk
                else:
                    raise self._died("REPL closed stdout before answering")

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

    def _read_stderr(self, key: selectors.SelectorKey) -> None:
        """Keep the tail of what stderr has; stop watching it at EOF."""
        chunk = os.read(key.fileobj.fileno(), 65536)
        if chunk:
            self._stderr_tail = (self._stderr_tail + chunk)[-_STDERR_KEEP:]
        else:
            self._selector.unregister(key.fileobj)

    def _died(self, what: str) -> ReplDied:
        """End a REPL that stopped talking without ever waiting on it unboundedly; say how it ended.

        It may have closed stdout yet keep running (or leave children holding stderr open), so it gets
        a short grace to exit, then its whole group is killed before stderr is read to EOF.
        """
        try:
            how = f"exited with code {self._proc.wait(timeout=_EXIT_GRACE_S)}"
        except subprocess.TimeoutExpired:
            how = "kept running and was killed"
        self._kill_group()
        self._proc.wait()
        self._drain_stderr(time.monotonic() + _DRAIN_S)
        self.kill()
        return ReplDied(f"{what}; the process {how}; stderr: {self.stderr_tail[-500:]!r}")

    def _drain_stderr(self, deadline: float) -> None:
        """Read stderr until EOF or `deadline` (a process outside the group could hold it open)."""
        for key in list(self._selector.get_map().values()):
            if key.data == "out":
                self._selector.unregister(key.fileobj)
        while self._selector.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in self._selector.select(remaining):
                self._read_stderr(key)

    def _kill_group(self) -> None:
        """SIGKILL the REPL's process group: the REPL and anything it spawned, even after it exited."""
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """Kill the whole process group, reap the REPL and close the pipes."""
        self._kill_group()
        self._proc.wait()
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
