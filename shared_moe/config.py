"""One config for every DeepSeek language model we run, built from a Hugging Face `config.json`.

Field names follow the Hugging Face configs (`n_routed_experts`, `kv_lora_rank`, `rope_parameters`, ...)
so a checkpoint's config maps onto this dataclass without a translation table. Defaults per
`model_type` are the ones the corresponding transformers config class (or DeepSeek's remote code)
uses when a field is absent, because released `config.json` files rely on them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "deepseek", "deepseek_v2", "deepseek_v3")
# The model_type of a config.json that lacks one, from the model class it names (as transformers' Auto classes map).
ARCHITECTURE_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "DeepseekForCausalLM": "deepseek",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
ROUTER_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclass
class MoEConfig:
    """Architecture of a DeepSeek-family decoder (dense Llama-shaped, DeepSeekMoE, V2/V3 with MLA)."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Multi-head latent attention (MLA). use_mla=False means standard (GQA) multi-head attention.
    use_mla: bool = True
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    # DeepSeekMoE. n_routed_experts=0 means every layer is a dense SwiGLU MLP.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.0
    seq_aux: bool = False
    # Multi-token prediction modules stored at model.layers.{num_hidden_layers + k}.
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected {SUPPORTED_MODEL_TYPES}")
        if self.topk_method not in ROUTER_METHODS:
            raise ValueError(f"topk_method {self.topk_method!r} is not supported; expected one of {ROUTER_METHODS}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported; expected 'softmax' or 'sigmoid'")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if self.n_routed_experts:
            self._check_router()
        if not self.use_mla and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    def _check_router(self) -> None:
        """Reject routers that cannot pick num_experts_per_tok experts: torch.topk would fail at the first forward,
        or (group-limited) quietly pick experts of excluded groups with a -inf score."""
        experts, top_k = self.n_routed_experts, self.num_experts_per_tok
        if top_k > experts:
            raise ValueError(f"num_experts_per_tok={top_k} is larger than n_routed_experts={experts}")
        if experts % self.n_group:
            raise ValueError(f"n_routed_experts={experts} is not divisible by n_group={self.n_group}")
        if self.topk_method == "greedy":
            return  # groups are not used
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} is larger than n_group={self.n_group}")
        per_group = experts // self.n_group
        if top_k > self.topk_group * per_group:
            raise ValueError(
                f"num_experts_per_tok={top_k} is larger than the {self.topk_group * per_group} experts in the "
                f"topk_group={self.topk_group} groups a {self.topk_method} router keeps "
                f"(n_routed_experts={experts} / n_group={self.n_group} = {per_group} per group)"
            )
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            raise ValueError(
                f"noaux_tc scores each group by its top-2 experts, but n_routed_experts={experts} / "
                f"n_group={self.n_group} leaves {per_group} per group"
            )

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def mha_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Width of the rotated slice: the decoupled rope key for MLA, the whole head for MHA."""
        return self.qk_rope_head_dim if self.use_mla else self.mha_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per MLA layer: compressed KV latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' config class for this model_type reads back to the same model."""
        values = {k: v for k, v in asdict(self).items() if k != "torch_dtype"}
        if not self.use_mla:
            for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                values.pop(key)
            values["head_dim"] = self.mha_head_dim
        if not self.n_routed_experts:
            prefixes = ("n_", "topk", "moe_", "routed", "norm_topk")
            moe_keys = [f.name for f in fields(self) if f.name.startswith(prefixes)]
            for key in moe_keys + ["num_experts_per_tok", "first_k_dense_replace", "scoring_func"]:
                values.pop(key, None)
        return values

    # ---- construction from Hugging Face configs --------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any] | str | Path) -> "MoEConfig":
        """Build from a HF config dict, a `config.json` path, or a checkpoint folder.

        DeepSeek-VL2 configs carry the language model under `language_config`; that part is used.
        """
        if not isinstance(cfg, dict):
            path = Path(cfg)
            cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        if "language_config" in cfg:
            cfg = dict(cfg["language_config"])
            cfg.setdefault("model_type", "deepseek_v2")
        model_type = cfg.get("model_type") or _model_type_from_architectures(cfg.get("architectures") or [])
        if model_type in ("mistral", "deepseek_llm"):
            model_type = "llama"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES} "
                "or a DeepSeek-VL2 config with a language_config"
            )
        values = dict(_MODEL_TYPE_DEFAULTS[model_type])
        names = {f.name for f in fields(cls)}
        values.update({k: v for k, v in cfg.items() if k in names and v is not None})
        # Nullable fields where null carries meaning.
        for key in ("q_lora_rank", "head_dim"):
            if key in cfg:
                values[key] = cfg[key]
        values["model_type"] = model_type
        values["torch_dtype"] = cfg.get("dtype") or cfg.get("torch_dtype")
        if values.get("num_key_value_heads") is None or "num_key_value_heads" not in cfg:
            values["num_key_value_heads"] = cfg.get("num_key_value_heads") or values["num_attention_heads"]
        values["rope_parameters"] = _rope_parameters(cfg)
        if model_type == "deepseek_v3":
            values["topk_method"], values["scoring_func"] = "noaux_tc", "sigmoid"
            values["num_nextn_predict_layers"] = cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0))
        elif model_type == "deepseek_v2":
            values["use_mla"] = bool(cfg.get("use_mla", True)) and cfg.get("kv_lora_rank", 512) is not None
            # DeepSeek-V2 code (transformers' and DeepSeek's) always rotates interleaved pairs in MLA and halves
            # in MHA; a rope_interleave key in the config is ignored there, so it must not change our layout.
            values["rope_interleave"] = values["use_mla"]
            if "scoring_func" not in cfg:
                values["scoring_func"] = "sigmoid" if values["topk_method"] == "noaux_tc" else "softmax"
        if values.get("use_mla", False):
            # MLA has one latent stream; HF configs still write a (meaningless) num_key_value_heads.
            values["num_key_value_heads"] = values["num_attention_heads"]
        values["n_group"] = values.get("n_group") or 1
        values["topk_group"] = values.get("topk_group") or 1
        if values.get("n_routed_experts") is None:
            values["n_routed_experts"] = 0
        return cls(**values)


def _model_type_from_architectures(architectures: list[str]) -> str:
    """A config.json without model_type: the type of the first model class we know, else an error (not a guess)."""
    for name in architectures:
        if name in ARCHITECTURE_MODEL_TYPES:
            return ARCHITECTURE_MODEL_TYPES[name]
    raise ValueError(
        f"config has no model_type and its architectures {architectures} name none of "
        f"{sorted(ARCHITECTURE_MODEL_TYPES)}; set model_type to one of {SUPPORTED_MODEL_TYPES}"
    )


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise legacy `rope_scaling` + `rope_theta` and HF-5 `rope_parameters` into one dict."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if params["rope_type"] in ("yarn", "llama3"):
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))
    return params


_MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # Llama-shaped dense models: DeepSeek LLM 7B, DeepSeek-Prover-V1.5/V2-7B, DeepSeek-VL's language model.
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        use_mla=False, rms_norm_eps=1e-6, n_routed_experts=0, rope_interleave=False, max_position_embeddings=2048,
    ),
    # DeepSeekMoE-16B (remote code): MHA with rotate-half RoPE, softmax greedy routing, shared experts.
    "deepseek": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
        use_mla=False, rope_interleave=False, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        n_shared_experts=0, moe_layer_freq=1, first_k_dense_replace=0, routed_scaling_factor=1.0,
    ),
    # transformers DeepseekV2Config defaults.
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=2048, use_mla=True, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1407,
        first_k_dense_replace=0, topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_interleave=True,
    ),
    # transformers DeepseekV3Config defaults.
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
        use_mla=True, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=2048, first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_interleave=True,
    ),
}
