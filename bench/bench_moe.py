"""MoE layer forward and forward+backward: shared_moe vs transformers' DeepseekV3MoE on the same weights.

Shape from the issue: hidden 512, 64 routed experts, top-6, expert width 256, 2048 tokens (plus one
shared expert and the V3 sigmoid router). transformers runs its `eager` (per-expert loop) and
`grouped_mm` experts implementations. shared_moe runs twice: with its default kernels (on AVX-512 CPUs the
fused routed-experts op, fp32 and bf16) and with its experts forced onto `torch._grouped_mm`. Also reports
forward GFLOP/s next to one torch.matmul (MKL in fp32) and one oneDNN matmul of the same FLOPs (what this
machine's GEMMs can do), the minor page faults per fwd+bwd (counted on the timed calls), which dominate
eager's time under glibc's default malloc settings, and the activation memory autograd keeps between forward
and backward. The implementations are timed round-robin (timing.interleaved_medians: every round each one
follows the same neighbour), then fwd+bwd again with each one alone, as a process running only that one would.

    python bench/bench_moe.py [--tokens 2048] [--repeats 5]
    python bench/bench_moe.py --only eager --dtype bfloat16   # one implementation, one dtype per process
"""

from __future__ import annotations

import argparse
import copy
import functools
import resource
import statistics
import sys
from pathlib import Path

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, median_seconds, print_table  # noqa: E402

from shared_moe import MoEConfig  # noqa: E402
from shared_moe.moe import MoE  # noqa: E402

HIDDEN, EXPERTS, TOP_K, WIDTH, SHARED = 512, 64, 6, 256, 1


def build(dtype: torch.dtype) -> tuple[dict[str, torch.nn.Module], torch.nn.Module]:
    hf_config = DeepseekV3Config(
        hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=WIDTH,
        n_shared_experts=SHARED, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    torch.manual_seed(0)
    reference = DeepseekV3MoE(hf_config)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.05)
        reference.gate.e_score_correction_bias.normal_(0, 0.1)
    hf = {}
    for impl in ("eager", "grouped_mm"):
        cfg = copy.deepcopy(hf_config)
        cfg._experts_implementation = impl
        module = DeepseekV3MoE(cfg)
        module.load_state_dict(reference.state_dict())
        hf[impl] = module.to(dtype)
        hf[impl].gate.e_score_correction_bias.data = reference.gate.e_score_correction_bias.data.float()
    ours = MoE(MoEConfig.from_hf(hf_config.to_dict()))
    ours.load_state_dict(reference.state_dict())
    return hf, ours.to(dtype)


def moe_flops(tokens: int) -> float:
    routed = tokens * TOP_K * (2 * HIDDEN * 2 * WIDTH + 2 * WIDTH * HIDDEN)
    shared = tokens * (2 * HIDDEN * 2 * WIDTH * SHARED + 2 * WIDTH * SHARED * HIDDEN)
    return routed + shared + tokens * 2 * HIDDEN * EXPERTS


class FaultCounter:
    """Wraps a callable and records the minor page faults of each call: fresh memory the OS must map and zero.

    Counted on the very calls that are timed, so the faults column describes the same heap states as the times
    (under glibc's default settings, whether a big block is reused or mapped afresh depends on what ran before).
    """

    def __init__(self, fn) -> None:
        self.fn, self.counts = fn, []

    def __call__(self) -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.fn()
        self.counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    def median_of_last(self, calls: int) -> float:
        return statistics.median(self.counts[-calls:])


def saved_activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward: distinct storages, not counting weights or x."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_())
    excluded = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in storages.items() if ptr not in excluded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["eager", "grouped_mm", "shared_moe"],
                        help="time fwd+bwd of this one implementation in a process that runs no other (what a "
                             "user's process and its allocator see); prints ms and page faults, no ratios")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="run only this dtype (default: both)")
    args = parser.parse_args()
    dtypes = [getattr(torch, args.dtype)] if args.dtype else [torch.float32, torch.bfloat16]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MoE hidden {HIDDEN}, {EXPERTS} experts, "
          f"top-{TOP_K}, width {WIDTH}, {args.tokens} tokens")
    rows, alone_rows = [], []
    for dtype in dtypes:
        hf, ours = build(dtype)
        x = torch.randn(1, args.tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
        upstream = torch.randn_like(x)

        def fwd_bwd(module: torch.nn.Module) -> None:
            module.zero_grad(set_to_none=True)
            xg = x.detach().requires_grad_()
            (module(xg) * upstream).sum().backward()

        label = str(dtype).removeprefix("torch.")
        if args.only:
            counter = FaultCounter(functools.partial(fwd_bwd, {**hf, "shared_moe": ours}[args.only]))
            step = median_seconds(counter, args.repeats)
            print(f"{label} {args.only} alone: fwd+bwd {step * 1e3:.1f} ms, "
                  f"{counter.median_of_last(args.repeats) / 1e3:.1f}k page faults / fwd+bwd")
            continue
        with torch.no_grad():
            error = (ours(x).float() - hf["eager"](x).float()).abs().max().item()
        ours_grouped_mm = copy.deepcopy(ours)
        ours_grouped_mm.experts.gemm_backend = "grouped_mm"
        modules = {
            "transformers eager": hf["eager"], "transformers grouped_mm": hf["grouped_mm"],
            "shared_moe, experts on torch._grouped_mm": ours_grouped_mm, "shared_moe": ours,
        }

        def fwd(module: torch.nn.Module) -> None:
            with torch.no_grad():
                module(x)

        forward = interleaved_medians({n: functools.partial(fwd, m) for n, m in modules.items()}, args.repeats)
        counters = {n: FaultCounter(functools.partial(fwd_bwd, m)) for n, m in modules.items()}
        train = interleaved_medians(counters, args.repeats)
        faults = {name: counter.median_of_last(args.repeats) for name, counter in counters.items()}
        alone_counters = {n: FaultCounter(functools.partial(fwd_bwd, m)) for n, m in modules.items()}
        alone = {name: median_seconds(counter, args.repeats) for name, counter in alone_counters.items()}
        alone_faults = {name: counter.median_of_last(args.repeats) for name, counter in alone_counters.items()}
        saved = {name: saved_activation_bytes(m, x) for name, m in modules.items()}
        flops = moe_flops(args.tokens)
        a = torch.randn(args.tokens, HIDDEN, dtype=dtype)
        b = torch.randn(HIDDEN, int(flops / (2 * args.tokens * HIDDEN)), dtype=dtype)
        matmul = median_seconds(lambda: torch.matmul(a, b), args.repeats)
        b_t = b.t().contiguous()
        onednn = median_seconds(lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], ""), args.repeats)
        for name in modules:
            rows.append([
                label, name, f"{forward[name] * 1e3:.1f}", f"{train[name] * 1e3:.1f}",
                f"{train['transformers eager'] / train[name]:.2f}x",
                f"{train['transformers grouped_mm'] / train[name]:.2f}x",
                f"{flops / forward[name] / 1e9:.0f}", f"{faults[name] / 1e3:.1f}k", f"{saved[name] / 2**20:.1f}",
            ])
            alone_rows.append([
                label, name, f"{alone[name] * 1e3:.1f}", f"{alone['transformers eager'] / alone[name]:.2f}x",
                f"{alone['transformers grouped_mm'] / alone[name]:.2f}x", f"{alone_faults[name] / 1e3:.1f}k",
            ])
        gflops = f"{flops / matmul / 1e9:.0f}"
        rows.append([label, "torch.matmul, same FLOPs", f"{matmul * 1e3:.1f}", "-", "-", "-", gflops, "-", "-"])
        gflops = f"{flops / onednn / 1e9:.0f}"
        rows.append([label, "oneDNN matmul, same FLOPs", f"{onednn * 1e3:.1f}", "-", "-", "-", gflops, "-", "-"])
        print(f"{label}: max |shared_moe - transformers| forward = {error:.2e}")
    if args.only:
        return
    print_table(
        "MoE layer (median ms; speed-ups are fwd+bwd vs each transformers implementation)",
        ["dtype", "implementation", "fwd ms", "fwd+bwd ms", "vs eager", "vs grouped_mm", "fwd GFLOP/s",
         "page faults / fwd+bwd", "saved for bwd MB"],
        rows,
    )
    print_table(
        "fwd+bwd with each implementation timed alone (its own warm-ups, then consecutive calls: the heap a process "
        "running only that implementation sees)",
        ["dtype", "implementation", "fwd+bwd ms", "vs eager", "vs grouped_mm", "page faults / fwd+bwd"],
        alone_rows,
    )


if __name__ == "__main__":
    main()
