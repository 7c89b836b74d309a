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
