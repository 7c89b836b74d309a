"""MoEConfig.from_hf on the config.json shapes of released checkpoints (values from their model cards)."""

from __future__ import annotations

import pytest
import torch

from shared_moe import MoEConfig, MoEForCausalLM

V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "num_nextn_predict_layers": 1, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "max_position_embeddings": 163840, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
V2_LITE = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "n_shared_experts": 2,
    "n_routed_experts": 64, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "routed_scaling_factor": 1.0, "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 0.707,
                                                   "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                                   "beta_fast": 32, "beta_slow": 1},
}
MOE_16B = {
    "model_type": "deepseek", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "scoring_func": "softmax", "norm_topk_prob": False, "rope_theta": 10000,
    "aux_loss_alpha": 0.001, "seq_aux": True,
}
VL2_TINY = {
    "model_type": "deepseek_vl_v2",
    "language_config": {
        "model_type": "deepseek_v2", "vocab_size": 129280, "hidden_size": 1280, "intermediate_size": 6848,
        "moe_intermediate_size": 896, "num_hidden_layers": 12, "num_attention_heads": 10, "num_key_value_heads": 10,
        "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
        "kv_lora_rank": None, "q_lora_rank": None, "use_mla": False, "topk_method": "greedy",
    },
}
VL2_BASE_LM = {
    "model_type": "deepseek_v2", "hidden_size": 2560, "num_attention_heads": 32, "n_routed_experts": 72,
    "topk_method": "noaux_tc", "routed_scaling_factor": 2.0, "norm_topk_prob": True, "kv_lora_rank": 512,
    "q_lora_rank": None,
}


def test_v3_config():
    cfg = MoEConfig.from_hf(V3)
    assert (cfg.topk_method, cfg.scoring_func, cfg.n_group, cfg.topk_group) == ("noaux_tc", "sigmoid", 8, 4)
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 40
    assert cfg.latent_dim == 576 and cfg.num_nextn_predict_layers == 1
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]


def test_v2_lite_config_has_no_q_lora_and_mla():
    cfg = MoEConfig.from_hf(V2_LITE)
    assert cfg.use_mla and cfg.q_lora_rank is None and cfg.scoring_func == "softmax"
    assert cfg.rope_parameters["mscale_all_dim"] == 0.707


def test_deepseek_moe_16b_is_mha_with_shared_experts():
    cfg = MoEConfig.from_hf(MOE_16B)
    assert not cfg.use_mla and not cfg.rope_interleave and cfg.n_shared_experts == 2
    assert cfg.topk_method == "greedy" and cfg.aux_loss_alpha == 0.001 and cfg.seq_aux


def test_vl2_language_configs():
    tiny = MoEConfig.from_hf(VL2_TINY)
    assert not tiny.use_mla and tiny.mha_head_dim == 128 and tiny.n_routed_experts == 64
    base = MoEConfig.from_hf(VL2_BASE_LM)
    assert base.use_mla and base.scoring_func == "sigmoid" and base.routed_scaling_factor == 2.0


def test_mha_moe_model_decodes_consistently():
    """DeepSeekMoE-16B shape (MHA + shared/routed experts), scaled down: cached decode equals full forward."""
    cfg = MoEConfig.from_hf({**MOE_16B, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                             "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5])
        steps = [out.logits] + [model(ids[:, t : t + 1], cache=out.cache).logits for t in range(5, 9)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert out.cache.nbytes() == 2 * 2 * 9 * 4 * 8 * 2 * 4  # layers x (K and V) x tokens x heads x dim x batch x fp32


def test_missing_fields_take_the_model_types_defaults():
    llama = MoEConfig.from_hf({"model_type": "llama", "vocab_size": 102400})
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads) == (4096, 32, 32)
    v2 = MoEConfig.from_hf({"model_type": "deepseek_v2"})
    assert v2.use_mla and v2.q_lora_rank == 1536 and v2.num_attention_heads == 32


def test_missing_model_type_comes_from_architectures_or_raises():
    without_type = {k: v for k, v in V3.items() if k != "model_type"}
    cfg = MoEConfig.from_hf({**without_type, "architectures": ["DeepseekV3ForCausalLM"]})
    assert cfg.model_type == "deepseek_v3" and cfg.use_mla and cfg.topk_method == "noaux_tc"
    lite = {k: v for k, v in V2_LITE.items() if k != "model_type"}
    assert MoEConfig.from_hf({**lite, "architectures": ["DeepseekV2ForCausalLM"]}).model_type == "deepseek_v2"
    for architectures in ([], ["GPT2LMHeadModel"]):
        with pytest.raises(ValueError, match="no model_type.*deepseek_v3"):
            MoEConfig.from_hf({**without_type, "architectures": architectures})


ROUTER = dict(model_type="deepseek_v3", hidden_size=16, n_routed_experts=8, moe_intermediate_size=8, n_group=4,
              topk_group=2, num_experts_per_tok=2, topk_method="noaux_tc", scoring_func="sigmoid")
GROUP_LIMITED = dict(model_type="deepseek_v2", topk_method="group_limited_greedy", scoring_func="softmax")


@pytest.mark.parametrize("overrides,message", [
    ({"num_experts_per_tok": 9, "n_group": 1, "topk_group": 1}, "num_experts_per_tok=9 is larger than n_routed_"),
    ({"n_group": 2, "topk_group": 3}, "topk_group=3 is larger than n_group=2"),
    ({"topk_group": 1, "num_experts_per_tok": 3}, "num_experts_per_tok=3 is larger than the 2 experts in the"),
    ({**GROUP_LIMITED, "topk_group": 1, "num_experts_per_tok": 3}, "larger than the 2 experts.*group_limited_greedy"),
    ({"n_group": 8, "topk_group": 4}, "noaux_tc scores each group by its top-2 experts.*n_group=8 leaves 1 per group"),
], ids=["top_k>experts", "topk_group>n_group", "top_k>kept", "top_k>kept-group-limited", "one-expert-groups"])
def test_router_configs_that_cannot_route_raise(overrides, message):
    """Each failed in torch.topk at the first forward, or routed to experts of excluded groups without a word."""
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**ROUTER, **overrides})


def test_greedy_router_ignores_the_group_fields():
    assert MoEConfig(**{**ROUTER, "topk_method": "greedy", "topk_group": 8}).topk_group == 8
