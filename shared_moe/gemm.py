"""GEMM kernels for the language core: grouped over expert-sorted rows, and dense linears.

On CPU in fp32, torch's matmuls run MKL's sgemm, which takes its AVX2 kernels on AMD CPUs; oneDNN (inside
libtorch, as `mkldnn::_linear_pointwise`) uses AVX-512 there and is about 2x faster (docs/benchmarks.md).
Both kernels below route CPU work through oneDNN with hand-written backwards (`linear` in fp32, the grouped
kernels in fp32 and bf16); everything else keeps torch's own kernels.

`linear` / `Linear`: F.linear / nn.Linear that take oneDNN on CPU fp32 (same parameters, hooks and keys).

`grouped_linear`: rows of expert e times weight[e].T, for weight (E, out, in); three kernels, chosen per call
by `grouped_linear(..., backend="auto")`:
* `onednn`: CPU fp32 and bf16. A small C++ op (csrc/grouped_gemm_onednn.cpp) runs one oneDNN matmul per
  expert (torch's CPU `_grouped_mm` runs MKL per group in fp32; in bf16 `at::mm` is oneDNN and the op calls
  it), with a hand-written backward. The op is built on first use (cpu_ext.py); without a C++ compiler the
  layer falls back to `grouped_mm` with one warning.
* `grouped_mm`: `torch._grouped_mm`, when rows and weights meet its 16-byte stride rule (GPU, CPU fallback) and,
  under torch.compile, are bf16 or fp16 (its meta kernel rejects fp32). Chosen explicitly for other tensors, it
  raises a ValueError that names `padded_bmm`.
* `padded_bmm`: every other case: scatter into an (E, max_count, in) buffer, one `bmm`, gather back.

`grouped_linear_gathered`: the same on the rows x[token_ids]. The oneDNN op gathers them one expert at a time,
so the (rows, in) copy is neither built nor saved for backward (a quarter of a MoE layer's saved activations).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from . import cpu_ext

BACKENDS = ("auto", "onednn", "grouped_mm", "padded_bmm")


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (n, in) @ weight (out, in).T (+ bias) through oneDNN; weight may be a strided view (free transposes)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def eager_cpu(x: torch.Tensor) -> bool:
    """On CPU, run eagerly: not under CPU autocast (which picks its own dtype), torch.compile or torch.func
    transforms (which trace or batch ops and need torch's own, with their compile and vmap rules), nor on a
    forward-mode AD dual tensor (the hand-written kernels have backwards only)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    return forward_ad.unpack_dual(x).tangent is None


def _plain_cpu_fp32(x: torch.Tensor) -> bool:
    return eager_cpu(x) and x.dtype == torch.float32


class OneDNNLinear(torch.autograd.Function):
    """y = x @ W.T + b with all three GEMMs (forward, input and weight gradients) in oneDNN.

    Under create_graph=True (a double backward) the gradients use plain differentiable matmuls instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if needs_weight else None, weight if needs_x else None)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, None if bias is None else bias.contiguous())  # oneDNN ignores bias strides

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        differentiable = torch.is_grad_enabled()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight if differentiable else _onednn_linear(grad_out, weight.t())
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.t() @ x if differentiable else _onednn_linear(grad_out.t(), x.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b


ONEDNN_MIN_MACS = 1 << 20  # below this, oneDNN's fixed per-call cost (about 10 us) outweighs its faster kernel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for CPU fp32 products of at least ONEDNN_MIN_MACS multiply-adds."""
    fp32_cpu = _plain_cpu_fp32(x) and weight.dtype == torch.float32
    large = x.numel() > 0 and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
    if not (fp32_cpu and large and onednn_linear_available()):
        return F.linear(x, weight, bias)
    out = OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` above: oneDNN for large CPU fp32 products, F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def onednn_available() -> bool:
    """Whether the oneDNN grouped GEMM op is built and loaded (see cpu_ext)."""
    return onednn_linear_available() and cpu_ext.available()


class OneDNNGroupedLinear(torch.autograd.Function):
    """Forward and backward as grouped oneDNN matmuls; the weight gradient comes out in the weight's own layout.

    Once differentiable: for double backward through the experts, set each layer's backend (an instance
    attribute): `for layer in model.moe_layers(): layer.experts.gemm_backend = "grouped_mm"` ("padded_bmm" where
    the widths are not 16-byte aligned).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, ends: list[int]) -> torch.Tensor:
        needs_rows, needs_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(rows if needs_weight else None, weight if needs_rows else None)
        ctx.ends = ends
        return torch.ops.shared_moe.grouped_linear(rows, weight, ends, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        rows, weight = ctx.saved_tensors
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.ops.shared_moe.grouped_linear(grad_out, weight, ctx.ends, True)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.shared_moe.grouped_weight_grad(grad_out, rows, ctx.ends)
        return grad_rows, grad_weight, None


class OneDNNGatheredGroupedLinear(torch.autograd.Function):
    """OneDNNGroupedLinear on the rows x[token_ids], gathered per expert inside the op: the gathered copy is
    neither built nor saved for backward, and the input gradient is added straight into x's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_ids: torch.Tensor, weight: torch.Tensor, ends: list[int]) -> torch.Tensor:
        needs_x, _, needs_weight = ctx.needs_input_grad[:3]
        ctx.save_for_backward(x if needs_weight else None, token_ids, weight if needs_x else None)
        ctx.ends, ctx.num_tokens = ends, x.shape[0]
        return torch.ops.shared_moe.grouped_linear_gather(x, token_ids, weight, ends)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        x, token_ids, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.shared_moe.grouped_linear_scatter(grad_out, token_ids, weight, ctx.ends, ctx.num_tokens)
        if ctx.needs_input_grad[2]:
            grad_weight = torch.ops.shared_moe.grouped_weight_grad_gather(grad_out, x, token_ids, ctx.ends)
        return grad_x, None, grad_weight, None


_GROUPED_MM_TRACED_DTYPES = (torch.bfloat16, torch.float16)  # torch._grouped_mm's meta kernel takes only these


def grouped_mm_unsupported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why `torch._grouped_mm` cannot run rows x against weight (E, out, in), or None when it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    out_features, in_features = weight.shape[1:]
    if (in_features * x.element_size()) % 16 or (out_features * x.element_size()) % 16:
        return (
            f"the shape is not aligned: rows of in_features={in_features} and out_features={out_features} "
            f"{x.dtype} values are not both multiples of 16 bytes (torch._grouped_mm's stride rule)"
        )
    if not weight.is_contiguous():
        return "the weight is not contiguous"
    if torch.compiler.is_compiling() and x.dtype not in _GROUPED_MM_TRACED_DTYPES:
        return f"torch.compile traces torch._grouped_mm only in bfloat16 and float16, not {x.dtype}"
    return None


def pick_backend(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> str:
    """The kernel `grouped_linear` will run for these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if eager_cpu(x) and x.dtype in (torch.float32, torch.bfloat16) and onednn_available():
        return "onednn"
    return "padded_bmm" if grouped_mm_unsupported(x, weight) else "grouped_mm"


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Rows of x (sorted by expert, counts[e] rows for expert e, offsets = int32 cumsum) times weight[e].T."""
    chosen = pick_backend(x, weight, backend)
    if chosen == "onednn":
        if not onednn_available():
            raise RuntimeError("the oneDNN grouped GEMM could not be built here; use backend='auto' or 'grouped_mm'")
        return OneDNNGroupedLinear.apply(x, weight, offsets.tolist())
    if chosen == "grouped_mm":
        _check_grouped_mm(x, weight)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    return padded_bmm(x, weight.transpose(1, 2), counts, offsets)


def _check_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> None:
    """A chosen "grouped_mm" that cannot run fails here with the way out, not deep inside torch."""
    reason = grouped_mm_unsupported(x, weight)
    if reason:
        raise ValueError(
            f'grouped GEMM backend "grouped_mm" cannot run a weight of shape {tuple(weight.shape)}: {reason}; '
            'use "padded_bmm", which runs any shape and also supports a double backward'
        )


def grouped_linear_gathered(
    x: torch.Tensor, token_ids: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """grouped_linear(x[token_ids], ...); the oneDNN kernel gathers per expert instead of copying all rows first."""
    chosen = pick_backend(x, weight, backend)
    if chosen == "onednn" and onednn_available():
        return OneDNNGatheredGroupedLinear.apply(x, token_ids, weight, offsets.tolist())
    rows = x.index_select(0, token_ids)  # backward is one index_add, not an accumulating index_put
    return grouped_linear(rows, weight, counts, offsets, chosen)


def padded_bmm(x: torch.Tensor, w_t: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Scatter sorted rows into an (E, max_count, in) buffer, one bmm with w_t (E, in, out), gather back."""
    experts = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    starts = offsets.long() - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[experts]
    buffer = x.new_zeros(len(counts), int(counts.max()), x.shape[-1])
    buffer = buffer.index_put((experts, slot), x)
    return torch.bmm(buffer, w_t)[experts, slot]
