"""fp32 CPU products: torch's default kernel (MKL's sgemm) against oneDNN, the one shared_moe.gemm uses.

The shapes of the MoE benchmark's expert products (about 192 rows per expert), a dense projection, and two
small products where oneDNN's fixed per-call cost decides (shared_moe.gemm.Linear keeps F.linear under 1M
multiply-adds). Also one full grouped product over 64 experts: torch._grouped_mm against shared_moe's op.

    python bench/bench_gemm.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds, print_table  # noqa: E402

from shared_moe.gemm import grouped_linear  # noqa: E402

# name, rows, in_features, out_features
PRODUCTS = [
    ("expert forward", 192, 512, 512),
    ("expert forward (down)", 192, 256, 512),
    ("expert input grad (down)", 192, 512, 256),
    ("dense projection", 512, 2048, 2048),
    ("decode step projection", 1, 2048, 2048),
    ("tiny (stays on F.linear)", 1, 512, 576),
]


def row(name: str, flops: int, torch_s: float, onednn_s: float) -> list[str]:
    return [name, f"{torch_s * 1e6:.0f}", f"{onednn_s * 1e6:.0f}", f"{flops / torch_s / 1e9:.0f}",
            f"{flops / onednn_s / 1e9:.0f}", f"{torch_s / onednn_s:.2f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, m, k, n in PRODUCTS:
        a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        mkl = median_seconds(lambda: torch.nn.functional.linear(a, w), args.repeats)
        onednn = median_seconds(lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""), args.repeats)
        rows.append(row(f"{name} {m}x{k}->{n}", 2 * m * k * n, mkl, onednn))
    dy, x = torch.randn(192, 512, generator=gen), torch.randn(192, 256, generator=gen)
    mkl = median_seconds(lambda: dy.t() @ x, args.repeats)
    onednn = median_seconds(lambda: torch.ops.mkldnn._linear_pointwise(dy.t(), x.t(), None, "none", [], ""),
                            args.repeats)
    rows.append(row("expert weight grad (down) 512x192->256", 2 * 192 * 512 * 256, mkl, onednn))

    counts = torch.bincount(torch.randint(0, 64, (12288,), generator=gen), minlength=64)
    offsets = counts.cumsum(0).to(torch.int32)
    x, weight = torch.randn(12288, 512, generator=gen), torch.randn(64, 512, 512, generator=gen)
    mkl = median_seconds(lambda: grouped_linear(x, weight, counts, offsets, "grouped_mm"), max(args.repeats // 10, 3))
    onednn = median_seconds(lambda: grouped_linear(x, weight, counts, offsets, "onednn"), max(args.repeats // 10, 3))
    rows.append(row("grouped: 64 experts, 12288 rows, 512->512", 2 * 12288 * 512 * 512, mkl, onednn))
    print_table(
        "fp32 products (median us; torch = F.linear or torch._grouped_mm, i.e. MKL per product)",
        ["product", "torch us", "oneDNN us", "torch GFLOP/s", "oneDNN GFLOP/s", "speed-up"],
        rows,
    )


if __name__ == "__main__":
    main()
