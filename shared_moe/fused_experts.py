"""A MoE layer's routed experts as one fused CPU op pair (csrc/routed_experts.cpp), fp32 and bf16.

The op runs each expert's rows through gather, gate_up GEMM, SwiGLU, down GEMM and (in backward) their
gradients in small per-thread workspaces, the experts spread over the threads (largest first) and each
expert's calls single-threaded, so no thread waits at a barrier after every small per-expert call. The
separate grouped ops (gemm.py, expert_ops.py) instead write every stage's (tokens * top_k, width) tensor to
memory and split every call over the threads. Results are bit-identical to those separate ops run on one
thread: same oneDNN matmuls, same row kernels, the input gradient summed in the same order. (On several
threads, oneDNN splits a bf16 weight-gradient reduction of about 2048 rows and more across them, which can move
the last bit of those separate-op gradients; the fused op runs each call on one thread, so its results do
not depend on the thread count.)

Used by `moe.Experts` when its grouped GEMM resolves to the oneDNN kernel and the AVX-512 row kernels run
(eager CPU, fp32 or bf16). Once differentiable, like the oneDNN grouped GEMM: for double backward set each
layer's backend (an instance attribute): `for layer in model.moe_layers(): layer.experts.gemm_backend = "grouped_mm"`
("padded_bmm" where the widths are not 16-byte aligned).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import expert_ops
from .gemm import pick_backend


def fused_experts_available(x: torch.Tensor, gate_up_proj: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `routed_experts` runs the fused op for these tensors and this grouped GEMM backend."""
    return pick_backend(x, gate_up_proj, backend) == "onednn" and expert_ops.use_fused_kernels(x)


class FusedRoutedExperts(torch.autograd.Function):
    """Saves the sorted rows' gate_up, SwiGLU and down activations, each only when a requested gradient needs it
    (x and the weights are kept anyway by the layer and its parameters)."""

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, weights, order, ends):
        needs_x, needs_gate_up_proj, needs_down_proj, needs_weights = ctx.needs_input_grad[:4]
        out, gate_up, h, down = torch.ops.shared_moe.routed_experts(
            x, order, gate_up_proj, down_proj, weights, ends, needs_x or needs_gate_up_proj, needs_down_proj)
        ctx.save_for_backward(x, order, gate_up_proj, down_proj, weights, gate_up, h,
                              down if needs_weights else x.new_empty(0))
        ctx.ends = ends
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, order, gate_up_proj, down_proj, weights, gate_up, h, down = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        grads = torch.ops.shared_moe.routed_experts_backward(
            grad, x, order, gate_up_proj, down_proj, weights, gate_up, h, down, ctx.ends, needs)
        return (*grads, None, None)


def routed_experts(
    x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
    order: torch.Tensor, ends: list[int],
) -> torch.Tensor:
    """sum_k weights[t, k] * expert(x[t]) for the flat (token, k) slots sorted by expert (`order`), with
    `ends[e]` one past expert e's last sorted row. x (tokens, d), fp32 weights (tokens, K) -> (tokens, d)."""
    tensors = (x, gate_up_proj, down_proj, weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return FusedRoutedExperts.apply(x, gate_up_proj, down_proj, weights, order, ends)
    return torch.ops.shared_moe.routed_experts(x, order, gate_up_proj, down_proj, weights, ends, False, False)[0]
