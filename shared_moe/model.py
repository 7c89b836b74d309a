"""The DeepSeek decoder: embeddings -> N x (attention, dense MLP or DeepSeekMoE) -> norm -> lm_head.

Module and parameter names equal the Hugging Face checkpoint keys (`model.layers.3.self_attn.kv_b_proj`,
`model.layers.3.mlp.experts.gate_up_proj`, ...), so loading is a key check, not a translation.
Multi-token-prediction modules live in `mtp_layers` and map to `model.layers.{num_hidden_layers + k}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import MultiHeadAttention, MultiHeadLatentAttention, attention_bias
from .cache import Cache
from .checkpoint import FP8_BLOCK_SIZE, load_into, save_pretrained
from .config import MoEConfig
from .gemm import Linear
from .generation import generate, stream
from .moe import MLP, MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    cache: Cache | None
    last_hidden_state: torch.Tensor


class DecoderLayer(nn.Module):
    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        attention = MultiHeadLatentAttention if config.use_mla else MultiHeadAttention
        self.self_attn = attention(config)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, cache, attention_mask=None):
        """`mask` is the additive attention bias; `attention_mask` (B, T) marks this call's real tokens (1) and
        padding (0) for the MoE's expert-load counts."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, attention_mask) if isinstance(self.mlp, MoE) else self.mlp(h))


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 multi-token prediction module: predicts token i+2 from hidden state i and token i+1.

    h' = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]) -> decoder layer -> shared_head.norm -> shared_head.head.
    The embedding is the main model's; the head is loaded from the checkpoint (a copy of lm_head in V3).
    """

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(d, config.rms_norm_eps)
        self.shared_head.head = Linear(d, config.vocab_size, bias=False)

    def predict(
        self, token_embeds, prev_hidden, rope, mask, cache, attention_mask=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits, hidden) for the positions of `prev_hidden`."""
        x = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(prev_hidden)], dim=-1))
        hidden = super().forward(x, rope, mask, cache, attention_mask)
        return self.shared_head.head(self.shared_head.norm(hidden)), hidden


class MoEModel(nn.Module):
    """The decoder stack (the `model.` prefix of the checkpoints)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoEForCausalLM(nn.Module):
    """DeepSeek LLM / DeepSeekMoE / DeepSeek-V2 / V3 causal LM with a latent (MLA) or KV (MHA) cache."""

    def __init__(self, config: MoEConfig, num_mtp_layers: int = 0):
        super().__init__()
        self.config = config
        self.model = MoEModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope_dim, config.rope_parameters)
        start = config.num_hidden_layers
        self.mtp_layers = nn.ModuleList(MTPLayer(config, start + k) for k in range(num_mtp_layers))

    # ---- helpers --------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def new_cache(self) -> Cache:
        return Cache([layer.self_attn.new_cache() for layer in self.model.layers])

    def new_mtp_cache(self) -> Cache:
        return Cache([layer.self_attn.new_cache() for layer in self.mtp_layers])

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def positions_and_mask(
        self,
        batch: int,
        length: int,
        past: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """RoPE (cos, sin) for the new tokens and the additive attention mask over past + new keys."""
        device = self.device
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: a token's position counts only the real tokens before it.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + length]
            else:
                position_ids = torch.arange(past, past + length, device=device).expand(batch, length)
        rope = self.rotary(position_ids.to(device))
        mask = attention_bias(attention_mask, length, past + length, dtype, device)
        return rope, mask

    # ---- forward --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """`attention_mask` (B, past + T) covers cached and new tokens, 1 = real, 0 = padding.

        `logits_to_keep=n` computes logits for the last n positions only (0 = all).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length, _ = x.shape
        if cache is None and use_cache:
            cache = self.new_cache()
        past = cache.seq_len if cache is not None else 0
        rope, mask = self.positions_and_mask(batch, length, past, attention_mask, position_ids, x.dtype)
        new_tokens_mask = attention_mask[:, past : past + length] if attention_mask is not None else None
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, mask, cache.layers[i] if cache is not None else None, new_tokens_mask)
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutput(logits=logits, cache=cache, last_hidden_state=hidden)

    def mtp_logits(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, depth: int = 0, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T - 1, V) of MTP module `depth`: position i predicts token i + 2.

        `hidden` is the main model's `last_hidden_state` for `input_ids` (B, T), and `attention_mask` (B, T) the
        mask given to that forward (1 = real, 0 = padding). Position i takes the mask and RoPE position of hidden
        state i, so padded rows give the same logits at their real positions as unpadded ones. Used for training
        the MTP module (cross-entropy against input_ids[:, 2:] plus the next token) and for inspection.
        """
        batch, length = input_ids.shape
        mtp_mask = attention_mask[:, : length - 1] if attention_mask is not None else None
        rope, mask = self.positions_and_mask(batch, length - 1, 0, mtp_mask, None, hidden.dtype)
        embeds = self.model.embed_tokens(input_ids[:, 1:])
        logits, _ = self.mtp_layers[depth].predict(embeds, hidden[:, :-1], rope, mask, None, mtp_mask)
        return logits

    # ---- generation (implemented in generation.py) ----------------------------------------
    def generate(self, input_ids: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Returns (B, T + new) tokens; see `shared_moe.generation.generate` for the arguments."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs):
        """Yields (B,) new token ids per step; same arguments as `generate`."""
        return stream(self, input_ids, max_new_tokens, **kwargs)

    # ---- training helpers -----------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_expert_bias(self, rate: float = 1e-3) -> None:
        """Aux-loss-free load balancing step for every MoE layer; call after each optimizer step."""
        for moe in self.moe_layers():
            moe.update_expert_bias(rate)

    def save_pretrained(self, path) -> None:
        """Write a Hugging Face checkpoint folder (config.json + model.safetensors, per-expert keys)."""
        save_pretrained(self, path)

    def load_hf_state_dict(
        self, tensors: dict[str, torch.Tensor], weight_block_size: Sequence[int] = FP8_BLOCK_SIZE
    ) -> None:
        """Load Hugging Face-named tensors (per-expert or fused experts, FP8 blocks, MTP layers).

        `weight_block_size` is the FP8 checkpoint's `quantization_config.weight_block_size`.
        """
        load_into(self, tensors, weight_block_size)
