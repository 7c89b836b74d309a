"""Tiny random Hugging Face checkpoints written by transformers' own `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import shared_moe
from shared_moe.model import MTPLayer

VOCAB = 96
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights large enough that routing and attention are far from uniform; router bias of both signs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=gen))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen) - 0.1)
    return model.eval()


def v3_config(**overrides) -> DeepseekV3Config:
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4,
        topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
    )
    values.update(overrides)
    return DeepseekV3Config(**values)


def v2_config(**overrides) -> DeepseekV2Config:
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, topk_method="greedy", routed_scaling_factor=1.0, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1,
    )
    values.update(overrides)
    return DeepseekV2Config(**values)


def llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
    )
    values.update(overrides)
    return LlamaConfig(**values)


HF_CLASSES = {"v3": DeepseekV3ForCausalLM, "v2": DeepseekV2ForCausalLM, "llama": LlamaForCausalLM}
CONFIGS = {"v3": v3_config, "v2": v2_config, "llama": llama_config}


def save_tiny(tmp_path: Path, kind: str, seed: int = 0, original_format: bool = True, yarn: bool = False, **overrides):
    """Build, randomise and save a tiny HF model; returns (hf_model, folder)."""
    torch.manual_seed(seed)
    if yarn:
        overrides["rope_parameters"] = dict(YARN)
    model = randomize(HF_CLASSES[kind](CONFIGS[kind](**overrides)), seed)
    folder = tmp_path / f"{kind}-{seed}-{'orig' if original_format else 'fused'}"
    model.save_pretrained(folder, save_original_format=original_format)
    return model, folder


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint("v3", seed=0, original_format=True, yarn=False, **config) -> (hf_model, folder)."""

    def make(kind: str, **kwargs):
        return save_tiny(tmp_path, kind, **kwargs)

    return make


def _add_mtp_layer(folder: Path, seed: int = 0) -> None:
    """Append a random MTP module at model.layers.{L} (per-expert keys, like the V3 release)."""
    config = shared_moe.MoEConfig.from_hf(folder)
    torch.manual_seed(seed)
    layer = MTPLayer(config, config.num_hidden_layers)
    tensors = load_file(folder / "model.safetensors")
    prefix = f"model.layers.{config.num_hidden_layers}."
    for name, value in layer.state_dict().items():
        value = 1.0 + 0.1 * torch.randn(value.shape) if "norm" in name else 0.15 * torch.randn(value.shape)
        if name == "mlp.experts.gate_up_proj":
            for e, fused in enumerate(value):
                gate, up = fused.chunk(2)
                tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate.clone()
                tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up.clone()
        elif name == "mlp.experts.down_proj":
            for e, down in enumerate(value):
                tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] = down.clone()
        else:
            tensors[prefix + name] = value
    tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors")


@pytest.fixture
def add_mtp_layer():
    """add_mtp_layer(folder, seed=0): append a random MTP module to a saved tiny V3 checkpoint."""
    return _add_mtp_layer
