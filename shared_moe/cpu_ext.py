"""The core's C++ CPU ops (shared_moe/csrc), built by torch's extension builder on first use.

`shared_moe::grouped_linear` and `shared_moe::grouped_weight_grad`: grouped GEMM through oneDNN (gemm.py).
`shared_moe::swiglu`, `weighted_gather_sum` and their backwards: fused AVX-512 expert kernels (expert_ops.py).
`shared_moe::routed_experts` and its backward: a MoE layer's routed experts as one op (fused_experts.py).

The first build takes 10-20 s on a 2-core machine; torch caches it under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions). Without a C++ compiler and ninja, `available()` warns once and returns False, and
the callers use plain torch ops instead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import warnings
from pathlib import Path


NAME = "shared_moe_cpu_ops"
CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("grouped_gemm_onednn.cpp", "moe_kernels_avx512.cpp", "routed_experts.cpp")]


def _headers_digest() -> str:
    """torch's builder rebuilds when a source changes but not a header; a define with the headers' hash does."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.h")))).hexdigest()[:16]


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs `ninja` through PATH; a venv used without activating it has pip's ninja only in its scripts
    folder, so put that folder first while building (PATH is restored afterwards)."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") or not shutil.which("ninja", path=scripts):
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([scripts, saved]) if saved else scripts
    try:
        yield
    finally:
        os.environ["PATH"] = saved


@functools.cache
def available() -> bool:
    """Builds (first call in a fresh environment) and loads the ops; False if this machine cannot."""
    builder_log = logging.getLogger("torch.utils.cpp_extension")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)  # its import warns that a CPU-only machine has no CUDA runtime
    try:
        from torch.utils.cpp_extension import _get_build_directory, load
    finally:
        builder_log.setLevel(level)
    try:
        if not (Path(_get_build_directory(NAME, verbose=False)) / f"{NAME}.so").exists():
            logging.getLogger(__name__).warning("shared_moe: compiling its C++ CPU ops on first use (10-20 s, cached)")
        with _ninja_on_path():
            load(
                name=NAME,
                sources=[str(p) for p in SOURCES],
                # at::parallel_for is OpenMP pragmas in torch's headers
                extra_cflags=["-O3", "-fopenmp", f"-DSHARED_MOE_HEADERS={_headers_digest()}"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        warnings.warn(f"shared_moe's C++ CPU ops unavailable, falling back to plain torch ops: {error}", stacklevel=2)
        return False
    return True
