"""The element-wise work around the routed experts' GEMMs: SwiGLU and the weighted combine of top-k outputs.

On AVX-512 CPUs, in fp32 and bf16, both run as fused C++ kernels (csrc/moe_kernels_avx512.cpp) with
hand-written backwards: one pass each instead of torch's chains of silu, mul, cat, index_copy and a batched
(1 x K) @ (K x d) bmm (docs/benchmarks.md has the numbers). They compute in fp32 and round once. Everywhere else
(GPU, other CPUs, torch.compile, torch.func, autocast) the same functions run plain torch ops.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cpu_ext
from .gemm import eager_cpu


@functools.cache
def fused_kernels_available() -> bool:
    """Whether this CPU runs the AVX-512 kernels and the C++ ops are built (ATEN_CPU_CAPABILITY can lower it)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and cpu_ext.available()


def use_fused_kernels(x: torch.Tensor) -> bool:
    """Whether ops on x run the fused kernels (here and in fused_experts.py)."""
    return x.dtype in (torch.float32, torch.bfloat16) and eager_cpu(x) and fused_kernels_available()


class FusedSwiGLU(torch.autograd.Function):
    """Under create_graph=True (a double backward) the backward runs differentiable torch ops instead."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return torch.ops.shared_moe.swiglu(gate_up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return torch.ops.shared_moe.swiglu_backward(grad, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        return torch.cat([grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig], dim=-1)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows laid out [gate | up], shape (..., 2 * width) -> (..., width)."""
    if use_fused_kernels(gate_up):
        h = FusedSwiGLU.apply(gate_up.reshape(-1, gate_up.shape[-1]))  # the kernel takes (rows, 2 * width)
        return h if gate_up.dim() == 2 else h.unflatten(0, gate_up.shape[:-1])
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class FusedWeightedGatherSum(torch.autograd.Function):
    """out[t] = sum_k weights[t, k] * rows[slots[t, k]]; slots is a permutation of the rows.

    Under create_graph=True (a double backward) the backward runs differentiable torch ops instead.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, slots, weights)
        return torch.ops.shared_moe.weighted_gather_sum(rows, slots, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        rows, slots, weights = ctx.saved_tensors
        if not torch.is_grad_enabled():
            grad_rows, grad_weights = torch.ops.shared_moe.weighted_gather_sum_backward(grad, rows, slots, weights)
            return grad_rows, None, grad_weights
        per_slot = (weights.unsqueeze(-1) * grad.float().unsqueeze(1)).to(rows.dtype)  # (tokens, K, d)
        grad_rows = torch.zeros_like(rows).index_put((slots.reshape(-1),), per_slot.reshape(-1, rows.shape[-1]))
        grad_weights = (rows[slots].float() * grad.float().unsqueeze(1)).sum(-1)
        return grad_rows, None, grad_weights


def combine(sorted_rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs. sorted_rows[i] belongs to flat slot order[i] = t * K + k.

    sorted_rows (N * K, d), order (N * K,), fp32 weights (N, K) -> (N, d) in sorted_rows' dtype. Deterministic:
    a fixed summation order and no atomics on either path.
    """
    tokens, top_k = weights.shape
    if use_fused_kernels(sorted_rows):
        slots = torch.empty_like(order).index_copy_(0, order, torch.arange(len(order), device=order.device))
        return FusedWeightedGatherSum.apply(sorted_rows, slots.view(tokens, top_k), weights.float())
    out = torch.empty_like(sorted_rows).index_copy_(0, order, sorted_rows)
    combine_weights = weights.to(out.dtype).view(tokens, 1, top_k)
    return torch.bmm(combine_weights, out.view(tokens, top_k, -1)).squeeze(1)
