"""The core's C++ CPU ops (shared_moe/csrc), built by torch's extension builder on first use.

`shared_moe::grouped_linear` and `shared_moe::grouped_weight_grad`: grouped GEMM through oneDNN (gemm.py).
`shared_moe::swiglu`, `weighted_gather_sum` and their backwards: fused AVX-512 expert kernels (expert_ops.py).

The first build takes 10-20 s on a 2-core machine; torch caches it under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions). Without a C++ compiler and ninja, `available()` warns once and returns False, and
the callers use plain torch ops instead.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import warnings
from pathlib import Path


NAME = "shared_moe_cpu_ops"
SOURCES = [Path(__file__).with_name("csrc") / name for name in ("grouped_gemm_onednn.cpp", "moe_kernels_avx512.cpp")]


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
        load(
            name=NAME,
            sources=[str(p) for p in SOURCES],
            extra_cflags=["-O3", "-fopenmp"],  # at::parallel_for is OpenMP pragmas in torch's headers
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        warnings.warn(f"shared_moe's C++ CPU ops unavailable, falling back to plain torch ops: {error}", stacklevel=2)
        return False
    return True
