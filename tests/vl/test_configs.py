"""Released config.json shapes (vl.md §1.1, §2.1) parse to the right architectures, defaults included.

No weights are built: the configs are checked at the dataclass level, where a wrong default would
otherwise only show up when a multi-gigabyte checkpoint fails to load.
"""

from shared_moe import MoEConfig
from vl.image_processing import VL2ImageProcessor
from vl.loading import vl1_original_config, vl2_config

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def test_deepseek_vl_7b_config_fills_llama_defaults():
    cfg = {
        "model_type": "multi_modality",
        "vision_config": {
            "cls": "HybridVisionTower",
            "params": {
                "concat_type": "tuple",
                "freeze_high": True,
                "freeze_low": True,
                "high_res_cfg": {
                    "model_name": "sam_b_downsample",
                    "image_size": 1024,
                    "select_layer": -1,
                    "pixel_mean": CLIP_MEAN,
                    "pixel_std": CLIP_STD,
                    "output_dim": 1024,
                },
                "low_res_cfg": {
                    "model_name": "siglip_large_patch16_384",
                    "image_size": 384,
                    "select_layer": -1,
                    "pixel_mean": [0.5] * 3,
                    "pixel_std": [0.5] * 3,
                    "output_dim": 1024,
                },
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "params": {
                "projector_type": "low_high_hybrid_split_mlp_gelu",
                "depth": 2,
                "input_dim": 1024,
                "n_embed": 4096,
            },
        },
        "language_config": {
            "max_position_embeddings": 16384,
            "model_type": "llama",
            "num_hidden_layers": 30,
            "torch_dtype": "bfloat16",
            "vocab_size": 102400,
        },
    }
    vcfg = vl1_original_config(cfg, image_token_id=100015)
    assert vcfg.image_size == 1024 and vcfg.num_image_tokens == 576
    assert (vcfg.high.width, vcfg.high.layers, vcfg.high.global_attn_indexes, vcfg.high.out_grid) == (
        768,
        12,
        (2, 5, 8, 11),
        24,
    )
    assert (vcfg.low.width, vcfg.low.layers, vcfg.low.patch_size, vcfg.low.gelu_approximate) == (1024, 24, 16, "none")
    assert vcfg.high_mean == tuple(CLIP_MEAN) and vcfg.low_mean == (0.5, 0.5, 0.5)
    lm = MoEConfig.from_hf(vcfg.language)
    assert (lm.hidden_size, lm.intermediate_size, lm.num_attention_heads, lm.num_key_value_heads) == (
        4096,
        11008,
        32,
        32,
    )
    assert (lm.num_hidden_layers, lm.vocab_size, lm.rms_norm_eps, lm.tie_word_embeddings) == (30, 102400, 1e-6, False)


def test_deepseek_vl_1_3b_config():
    cfg = {
        "model_type": "multi_modality",
        "vision_config": {
            "cls": "CLIPVisionTower",
            "params": {
                "model_name": "siglip_large_patch16_384",
                "image_size": 384,
                "select_feature": "same",
                "select_layer": -1,
                "pixel_mean": [0.5] * 3,
                "pixel_std": [0.5] * 3,
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 1024, "n_embed": 2048},
        },
        "language_config": {
            "model_type": "llama",
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "vocab_size": 102400,
            "max_position_embeddings": 16384,
        },
    }
    vcfg = vl1_original_config(cfg, image_token_id=100015)
    assert vcfg.high is None and vcfg.image_size == 384 and vcfg.num_image_tokens == 576
    lm = MoEConfig.from_hf(vcfg.language)
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads) == (2048, 24, 16)


VL2_VISION = {
    "model_name": "siglip_so400m_patch14_384",
    "image_size": 384,
    "patch_size": 14,
    "width": 1152,
    "layers": 27,
    "mlp_ratio": 3.7362,
    "global_pool": "map",
    "ignore_head": True,
    "class_token": False,
    "num_classes": 0,
    "use_checkpoint": False,
}


def _vl2(language: dict, n_embed: int) -> dict:
    return {
        "model_type": "deepseek_vl_v2",
        "tile_tag": "2D",
        "global_view_pos": "head",
        "vision_config": VL2_VISION,
        "projector_config": {
            "projector_type": "downsample_mlp_gelu",
            "input_dim": 1152,
            "n_embed": n_embed,
            "depth": 2,
            "mlp_ratio": 1,
            "downsample_ratio": 2,
        },
        "language_config": language,
    }


def test_deepseek_vl2_tiny_config():
    language = {
        "model_type": "deepseek_v2",
        "vocab_size": 129280,
        "hidden_size": 1280,
        "intermediate_size": 6848,
        "moe_intermediate_size": 896,
        "num_hidden_layers": 12,
        "num_attention_heads": 10,
        "num_key_value_heads": 10,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "use_mla": False,
        "kv_lora_rank": None,
        "q_lora_rank": None,
        "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0,
        "v_head_dim": 0,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "max_position_embeddings": 4096,
    }
    vcfg = vl2_config(_vl2(language, 1280), image_token_id=128815)
    assert (vcfg.vision.width, vcfg.vision.layers, vcfg.vision.heads, vcfg.vision.mlp_dim) == (1152, 27, 16, 4304)
    assert vcfg.vision.gelu_approximate == "tanh" and vcfg.vision.grid == 27
    lm = MoEConfig.from_hf(vcfg.language)
    assert not lm.use_mla and lm.mha_head_dim == 128 and lm.n_routed_experts == 64 and lm.num_experts_per_tok == 6
    assert lm.scoring_func == "softmax" and lm.topk_method == "greedy" and not lm.norm_topk_prob


def test_deepseek_vl2_base_config_takes_vl2_defaults_for_omitted_fields():
    language = {
        "vocab_size": 129280,
        "hidden_size": 2560,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "n_routed_experts": 72,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "q_lora_rank": None,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.0,
        "n_group": 1,
        "topk_group": 1,
        "max_position_embeddings": 4096,
    }
    vcfg = vl2_config(_vl2(language, 2560), image_token_id=128815)
    lm = MoEConfig.from_hf(vcfg.language)
    assert (lm.num_hidden_layers, lm.num_attention_heads, lm.kv_lora_rank, lm.q_lora_rank) == (30, 32, 512, None)
    assert lm.use_mla and (lm.qk_nope_head_dim, lm.qk_rope_head_dim, lm.v_head_dim) == (128, 64, 128)
    assert lm.scoring_func == "sigmoid" and lm.topk_method == "noaux_tc" and lm.routed_scaling_factor == 2.0
    assert lm.norm_topk_prob and lm.n_routed_experts == 72


def test_vl2_processor_geometry_from_the_released_config():
    proc = VL2ImageProcessor(tile_size=384, patch_size=14, downsample_ratio=2)
    assert proc.tokens_per_side == 14
    assert proc.token_count(proc.grid_for((1024, 768), 1)) == 1415
