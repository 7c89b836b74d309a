"""Shared fixtures: where the recorded data lives and how to start the fake REPL.

Tests run with --import-mode=importlib, so helpers are exposed as fixtures, not importable names.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from prover.pool import PoolConfig, ReplPool
from prover.repl_process import ProcessConfig

HERE = Path(__file__).resolve().parent
FAKE_REPL = HERE / "fake_repl.py"
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
TRANSCRIPTS = SHARED / "data" / "lean_repl_transcripts"


def _fake_command(*flags: str) -> tuple[str, ...]:
    return (sys.executable, str(FAKE_REPL), *flags)


def _recorded_sessions() -> list[Path]:
    """Every transcript that has both its requests and its recorded responses."""
    return sorted(
        p.with_suffix("")
        for p in TRANSCRIPTS.glob("*/*.in")
        if p.with_name(p.stem + ".expected.out").exists()
    )


def pytest_generate_tests(metafunc):
    if "session" in metafunc.fixturenames:
        sessions = _recorded_sessions()
        metafunc.parametrize("session", sessions, ids=[f"{p.parent.name}/{p.name}" for p in sessions])


@pytest.fixture
def transcripts() -> Path:
    return TRANSCRIPTS


@pytest.fixture
def shared_dir() -> Path:
    return SHARED


@pytest.fixture
def fake_cmd():
    return _fake_command


@pytest.fixture
def make_pool():
    """Factory for pools over the fake REPL in sim mode; closes every pool it made."""
    pools: list[ReplPool] = []

    def make(*flags: str, workers: int = 1, max_uses: int | None = None,
             memory_limit_bytes: int | None = None, header_timeout: float = 30.0) -> ReplPool:
        cfg = PoolConfig(ProcessConfig(_fake_command(*flags), memory_limit_bytes=memory_limit_bytes),
                         workers=workers, max_uses=max_uses, header_timeout=header_timeout)
        pools.append(ReplPool(cfg))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def kimina_server():
    """A stand-in Kimina Lean Server on 127.0.0.1: /api/check runs each snippet in a fresh sim fake REPL.

    `state["fail_first"]` makes the first N requests answer HTTP 500 (retry tests); `state["requests"]`
    counts requests.
    """
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prover.repl_process import ReplProcess, ReplTimeout

    state = {"fail_first": 0, "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_POST(self):
            state["requests"] += 1
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/api/check" or state["fail_first"] > 0:
                state["fail_first"] -= 1
                self.send_response(500 if self.path == "/api/check" else 404)
                self.end_headers()
                return
            results = []
            for snip in body["snippets"]:
                proc = ReplProcess(ProcessConfig(_fake_command()))
                start = time.monotonic()
                try:
                    resp = proc.request({"cmd": snip["code"]}, body["timeout"])
                    results.append({"id": snip["id"], "time": time.monotonic() - start, "response": resp.raw
                                    if hasattr(resp, "raw") else {"message": resp.message}})
                except ReplTimeout:
                    results.append({"id": snip["id"], "time": time.monotonic() - start,
                                    "error": f"Lean REPL command timed out in {body['timeout']} seconds"})
                finally:
                    proc.close()
            data = json.dumps({"results": results}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()
