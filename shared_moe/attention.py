"""Attention: multi-head latent attention (MLA, DeepSeek-V2/V3) and grouped multi-head attention.

MLA caches one row per token: the RMS-normalised KV latent c (kv_lora_rank) and the rotated shared
rope key k_pe (qk_rope_head_dim). Two equivalent ways to attend over that cache:

* expanded: project every cached latent through kv_b_proj into per-head keys and values, then SDPA.
  Cheapest for long prefills without history.
* absorbed: fold W_UK into the query (q_nope @ W_UK lives in latent space) and W_UV after the
  attention-weighted sum, so scores are taken directly against the cached latents. The cost per
  step grows with T * H * (2r + dr) instead of T * r * H * (dn + dv); this is the decode path.
  All heads share one key/value stream, so heads are folded into the query-length dimension and
  each step is two batched matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, LatentCache
from .config import MoEConfig
from .gemm import Linear
from .norm import RMSNorm
from .rope import rotate_halves, rotate_interleaved, softmax_scale


def causal_bias(
    query_len: int, key_len: int, dtype: torch.dtype, device: torch.device, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Additive (B or 1, 1, Tq, Tk) mask: each query sees keys up to its own position and no padded key.

    Masked entries use the dtype's minimum rather than -inf so fully padded query rows stay finite.
    """
    past = key_len - query_len
    q_pos = torch.arange(past, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :key_len].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def attention_bias(
    attention_mask: torch.Tensor | None, query_len: int, key_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The mask a layer needs, or None when plain causal attention (or no masking at all) is exact.

    None means: a single query, or a prefill without history; either way without key padding.
    """
    has_padding = attention_mask is not None and not bool(attention_mask[:, :key_len].all())
    if not has_padding and (query_len == 1 or query_len == key_len):
        return None
    return causal_bias(query_len, key_len, dtype, device, attention_mask if has_padding else None)


class MultiHeadAttention(nn.Module):
    """Llama-style attention with q/k/v/o projections, GQA and rotate-half RoPE (DeepSeek LLM, MoE-16B, VL2-Tiny)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.mha_head_dim
        # Plain 1/sqrt(d): YaRN's mscale_all_dim softmax temperature belongs to MLA only; Llama attention
        # (transformers' Llama, DeepSeekMoE and VL2 remote code) never applies it.
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rope)
        q = rotate_halves(q, cos, sin).to(x.dtype)
        k = rotate_halves(k, cos, sin).to(x.dtype)
        if cache is not None:
            k, v = cache.update(k, v)
        causal = mask is None and length > 1
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MultiHeadLatentAttention(nn.Module):
    """MLA with optional q-LoRA; weights named as in the Hugging Face DeepSeek-V2/V3 checkpoints."""

    def __init__(self, config: MoEConfig, absorb: str = "auto"):
        super().__init__()
        if absorb not in ("auto", "always", "never"):
            raise ValueError(f"absorb must be 'auto', 'always' or 'never', got {absorb!r}")
        self.absorb = absorb
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.interleaved = config.rope_interleave
        qk_head_dim = self.nope_dim + self.rope_dim
        self.scale = softmax_scale(qk_head_dim, config.rope_parameters)
        d, h = config.hidden_size, self.num_heads
        if self.q_lora_rank is None:
            self.q_proj = Linear(d, h * qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(d, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = Linear(self.q_lora_rank, h * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = Linear(h * self.v_head_dim, d, bias=config.attention_bias)

    def new_cache(self) -> LatentCache:
        return LatentCache()

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotate = rotate_interleaved if self.interleaved else rotate_halves
        return rotate(x, cos, sin).to(x.dtype)

    def use_absorbed(self, query_len: int, key_len: int) -> bool:
        if self.absorb != "auto":
            return self.absorb == "always"
        if key_len == query_len and query_len > 1:
            return False
        r, dn, dv, dr = self.kv_lora_rank, self.nope_dim, self.v_head_dim, self.rope_dim
        absorbed = query_len * key_len * (2 * r + dr) + query_len * r * (dn + dv)
        expanded = key_len * r * (dn + dv) + query_len * key_len * (dn + dr + dv)
        return absorbed < expanded

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LatentCache | None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        h, r = self.num_heads, self.kv_lora_rank
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, length, h, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        cos, sin = rope
        q_pe = self._rotate(q_pe, cos.unsqueeze(1), sin.unsqueeze(1))

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, self.rope_dim], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), self._rotate(k_pe, cos, sin)], dim=-1)
        if cache is not None:
            latent = cache.update(latent)
        key_len = latent.shape[1]
        if self.use_absorbed(length, key_len):
            out = self._absorbed(q_nope, q_pe, latent, mask)
        else:
            out = self._expanded(q_nope, q_pe, latent, mask)
        return self.o_proj(out.reshape(batch, length, h * self.v_head_dim))

    def _kv_b_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, dn, r) and W_UV (H, dv, r) as views of kv_b_proj.weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, h, length, _ = q_nope.shape
        key_len = latent.shape[1]
        w_uk, w_uv = self._kv_b_heads()
        q_latent = torch.matmul(q_nope, w_uk)  # (B, H, T, r)
        query = torch.cat([q_latent, q_pe], dim=-1).reshape(batch, h * length, -1)
        scores = torch.bmm(query, latent.transpose(1, 2)).view(batch, h, length, key_len)
        scores = scores.float() * self.scale
        if mask is None and length > 1:
            mask = causal_bias(length, key_len, torch.float32, scores.device)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1).to(latent.dtype).view(batch, h * length, key_len)
        context = torch.bmm(probs, latent[..., : self.kv_lora_rank]).view(batch, h, length, -1)
        out = torch.matmul(context, w_uv.transpose(1, 2))  # (B, H, T, dv)
        return out.transpose(1, 2)

    def _expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, h, length, _ = q_nope.shape
        key_len = latent.shape[1]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(batch, key_len, h, self.nope_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(batch, h, key_len, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        causal = mask is None and length > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        return out.transpose(1, 2)
