"""SwiGLU and the top-k combine of the routed experts: shared_moe's fused CPU kernels vs the torch ops they replace.

Shapes of bench_moe.py: 2048 tokens, top-6, expert width 256, hidden 512. The torch rows run exactly what
`shared_moe.expert_ops` runs when the fused kernels are unavailable (silu * up; index_copy + batched bmm),
forward alone and forward+backward. Needs an AVX-512 CPU and a C++ compiler.

    python bench/bench_expert_ops.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds, print_table  # noqa: E402

from shared_moe import expert_ops  # noqa: E402

TOKENS, TOP_K, WIDTH, HIDDEN = 2048, 6, 256, 512


def routing() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(64, generator=gen)[:TOP_K] for _ in range(TOKENS)])
    return torch.argsort(indices.reshape(-1), stable=True), torch.rand(TOKENS, TOP_K, generator=gen)


def timings(dtype: torch.dtype, repeats: int) -> dict[str, tuple[float, float]]:
    """(forward, forward+backward) median seconds per op, on whichever path expert_ops takes now."""
    gen = torch.Generator().manual_seed(1)
    gate_up = torch.randn(TOKENS * TOP_K, 2 * WIDTH, generator=gen).to(dtype)
    rows = torch.randn(TOKENS * TOP_K, HIDDEN, generator=gen).to(dtype)
    order, weights = routing()
    cases = {
        "swiglu": (lambda g: expert_ops.swiglu(g), [gate_up]),
        "combine": (lambda r, w: expert_ops.combine(r, order, w), [rows, weights]),
    }
    result = {}
    for name, (op, inputs) in cases.items():
        def forward(op=op, inputs=inputs):
            with torch.no_grad():
                op(*inputs)

        def train(op=op, inputs=inputs):
            leaves = [t.detach().requires_grad_() for t in inputs]
            op(*leaves).sum().backward()

        result[name] = (median_seconds(forward, repeats), median_seconds(train, repeats))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not expert_ops.fused_kernels_available():
        sys.exit("the fused kernels are unavailable here (they need an AVX-512 CPU and a C++ compiler)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {TOKENS} tokens, top-{TOP_K}, width {WIDTH}, hidden {HIDDEN}")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        fused = timings(dtype, args.repeats)
        with mock.patch.object(expert_ops, "use_fused_kernels", lambda x: False):
            plain = timings(dtype, args.repeats)
        for name in fused:
            (f_fwd, f_train), (p_fwd, p_train) = fused[name], plain[name]
            rows.append([str(dtype).removeprefix("torch."), name, f"{p_fwd * 1e3:.2f}", f"{f_fwd * 1e3:.2f}",
                         f"{p_fwd / f_fwd:.2f}x", f"{p_train * 1e3:.2f}", f"{f_train * 1e3:.2f}",
                         f"{p_train / f_train:.2f}x"])
    print_table(
        "Expert element-wise ops (median ms): torch ops vs fused kernels",
        ["dtype", "op", "torch fwd", "fused fwd", "speed-up", "torch fwd+bwd", "fused fwd+bwd", "speed-up"],
        rows,
    )


if __name__ == "__main__":
    main()
