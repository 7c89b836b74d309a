"""Fixtures for the demos tests: the random tiny VL model, image files, and the fake Lean REPL command.

Tests run with --import-mode=importlib, so helpers are fixtures rather than importable names.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demos.tiny import RANDOM_WEIGHTS_LABEL, build_random_tiny_vl
from demos.vl_chat import ChatEngine

FAKE_REPL = Path(__file__).resolve().parents[1] / "prover" / "fake_repl.py"


@pytest.fixture(scope="session")
def engine():
    chat = ChatEngine(*build_random_tiny_vl(seed=0), RANDOM_WEIGHTS_LABEL)
    yield chat
    chat.close()


@pytest.fixture
def write_image(tmp_path):
    """write_image(name, w, h, seed) -> path of a seeded noise PNG in the test's temp dir."""

    def write(name: str = "photo.png", width: int = 64, height: int = 48, seed: int = 0) -> str:
        rng = np.random.default_rng(seed)
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        return str(path)

    return write


@pytest.fixture
def fake_repl_cmd() -> str:
    """A --repl-cmd that starts the prover tests' fake REPL (sim mode) with this interpreter."""
    return shlex.join([sys.executable, str(FAKE_REPL)])
