"""DeepSeekMoE: shared experts plus fine-grained routed experts behind every DeepSeek router.

Routers (all math in fp32, whatever the model dtype):
* `greedy`: softmax (or sigmoid) scores, plain top-k (DeepSeekMoE-16B, V2-Lite, VL2-Tiny/Small);
* `group_limited_greedy`: experts split into n_group groups scored by their max; only the best
  topk_group groups compete (DeepSeek-V2);
* `noaux_tc`: sigmoid scores plus the fp32 `e_score_correction_bias` for *selection only*; groups
  scored by the sum of their top-2 biased scores (DeepSeek-V3, VL2-Base).
Excluded experts are masked with -inf (a 0.0 fill lets a group with negative biased scores win).

Routed experts run as one sorted grouped GEMM: token-slot pairs are sorted by expert once, each
projection is one grouped GEMM call (`gemm.py`: oneDNN on CPU in fp32 and bf16, `torch._grouped_mm`,
or padded `bmm` when the shapes break its 16-byte stride rule). SwiGLU and the weighted sum of a
token's K expert outputs are `expert_ops.py` (fused kernels on AVX-512 CPUs); the sum is deterministic
(no atomics, fixed order). Where all of those run as the C++ CPU ops, the whole chain is one op per direction
instead (`fused_experts.py`), with the same results and far less memory traffic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .expert_ops import combine, swiglu
from .fp32_buffers import Fp32BuffersMixin
from .fused_experts import fused_experts_available, routed_experts
from .gemm import Linear, grouped_linear, grouped_linear_gathered, linear


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopkRouter(Fp32BuffersMixin):
    """Chooses num_experts_per_tok experts per token and their combination weights."""

    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.method = config.topk_method
        self.scoring = config.scoring_func
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if self.method == "noaux_tc":
            bias = torch.zeros(self.num_experts, dtype=torch.float32, device="cpu")
            self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> (fp32 scores (N, E), fp32 weights (N, K), indices (N, K))."""
        logits = linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()
        if self.method != "greedy" and self.n_group > 1:
            choice = self._limit_groups(choice)
        indices = torch.topk(choice, k=self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights * self.routed_scaling_factor, indices

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        if self.method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)


class Experts(nn.Module):
    """Routed experts stored fused like transformers 5: gate_up_proj (E, 2I, d), down_proj (E, d, I).

    `gemm_backend` picks the grouped GEMM kernel (see `gemm.BACKENDS`); "auto" chooses per device and dtype, and
    where it resolves to oneDNN on an AVX-512 CPU the whole chain runs as the fused op of `fused_experts.py`.
    Those kernels are once-differentiable; "grouped_mm" supports a double backward, and so does "padded_bmm", which
    also runs widths that are not 16-byte aligned (where "grouped_mm" raises). It is set per layer:
    `for layer in model.moe_layers(): layer.experts.gemm_backend = "grouped_mm"`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gemm_backend: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.gemm_backend = gemm_backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, d), indices/weights (N, K) -> sum_k weights[:, k] * expert_{indices[:, k]}(x), shape (N, d)."""
        top_k = indices.shape[1]
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        offsets = counts.cumsum(0).to(torch.int32)
        if fused_experts_available(x, self.gate_up_proj, self.gemm_backend):
            return routed_experts(x, self.gate_up_proj, self.down_proj, weights.float(), order, offsets.tolist())
        gate_up = grouped_linear_gathered(x, order // top_k, self.gate_up_proj, counts, offsets, self.gemm_backend)
        out_sorted = grouped_linear(swiglu(gate_up), self.down_proj, counts, offsets, self.gemm_backend)
        return combine(out_sorted, order, weights)


class MoE(Fp32BuffersMixin):
    """Shared experts + routed experts. Counts tokens per expert in training forwards for aux-loss-free balancing."""

    fp32_buffers = ("tokens_per_expert",)

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.gate = TopkRouter(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, bias=config.mlp_bias)
            if config.n_shared_experts
            else None
        )
        counts = torch.zeros(config.n_routed_experts, dtype=torch.float32, device="cpu")
        self.register_buffer("tokens_per_expert", counts, persistent=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., d). `attention_mask` (x.shape[:-1]; 1 = real token, 0 = padding) only decides which tokens
        `tokens_per_expert` counts; every token is computed."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat)
        if self._counts_tokens():
            self._count(indices, attention_mask)
        out = self.experts(flat, indices, weights).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _counts_tokens(self) -> bool:
        """Whether this forward is a training step whose expert loads `update_expert_bias` should see.

        That is: train() mode with autograd on, so generate() and evaluation (both under no_grad) do not count
        on a model left in train() mode; and no torch.func transform active, since those forbid updating a
        captured buffer in place (their forwards are not counted).
        """
        return self.training and torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()

    @torch.no_grad()
    def _count(self, indices: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Adds the real tokens' expert choices to tokens_per_expert; padding goes to an extra bin that is dropped
        (a fixed-shape mask, not a boolean selection, keeps the shapes static)."""
        num_experts = len(self.tokens_per_expert)
        if attention_mask is not None:
            padding = attention_mask.reshape(-1, 1) == 0
            indices = indices.masked_fill(padding, num_experts)
        self.tokens_per_expert += torch.bincount(indices.reshape(-1), minlength=num_experts + 1)[:num_experts]

    @torch.no_grad()
    def update_expert_bias(self, rate: float = 1e-3, recenter: bool = True) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): raise the bias of under-loaded experts, lower overloaded ones.

        Uses the tokens counted since the last update, then resets the counts. Only `noaux_tc` routers
        have a bias; for them `rate` is the bias update speed gamma (1e-3 in DeepSeek-V3).
        """
        counts = self.tokens_per_expert
        if rate and hasattr(self.gate, "e_score_correction_bias") and counts.sum() > 0:
            delta = rate * torch.sign(counts.mean() - counts)
            if recenter:
                delta = delta - delta.mean()
            self.gate.e_score_correction_bias += delta
        counts.zero_()
