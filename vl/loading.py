"""`vl.load`: a checkpoint folder -> (model, processor).

Four layouts, told apart by `config.json`'s `model_type`:
  multi_modality      original DeepSeek-VL (vision_config.cls = CLIPVisionTower | HybridVisionTower)
  deepseek_vl         transformers' DeepSeek-VL 1.3B port (SigLIP + aligner.linear1/2)
  deepseek_vl_hybrid  transformers' DeepSeek-VL 7B port (SAM + SigLIP, q/k/v split)
  deepseek_vl_v2      original DeepSeek-VL2
transformers' names are renamed to the original ones, which are the module names of this package.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig

from shared_moe import CheckpointMismatchError, read_safetensors
from shared_moe.checkpoint import check_tensors

from .batch import VisionLanguageModel
from .image_io import DEFAULT_MAX_PIXELS
from .image_processing import (
    CANDIDATE_RESOLUTIONS,
    CLIP_MEAN,
    CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    VL2ImageProcessor,
    VLImageProcessor,
    background_color,
)
from .modeling_vl import DeepseekVL, VLConfig
from .modeling_vl2 import DeepseekVL2, VL2Config
from .processing import VL2ChatProcessor, VLChatProcessor, token_id
from .sam import SAMConfig
from .siglip import SigLIPConfig

# Architectures named by `model_name` in the original configs.
SIGLIP_MODELS = {
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_dim=4096),
    "siglip_so400m_patch14_384": dict(image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_dim=4304),
}
SAM_MODELS = {"sam_b_downsample": {}}
# Defaults of DeepSeek-VL2's own `DeepseekV2Config` for fields its released configs omit (the base
# model's `language_config` leaves out the layer and head counts).
VL2_LANGUAGE_DEFAULTS = {
    "model_type": "deepseek_v2",
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "kv_lora_rank": 512,
    "use_mla": True,
    "moe_layer_freq": 1,
    "rms_norm_eps": 1e-6,
}
HF_GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}
UNUSED_KEYS = re.compile(r"(^|\.)attn_pool\.|(^|\.)head\.|(high|low)_layer_norm\.")


def _override(base: dict, params: dict, cls) -> dict:
    """Explicit architecture fields in `params` win over the registry entry of `model_name`."""
    names = {f.name for f in fields(cls)}
    out = dict(base)
    out.update({k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names})
    return out


def siglip_from_params(params: dict, gelu: str) -> SigLIPConfig:
    name = params.get("model_name", "")
    base = SIGLIP_MODELS.get(name)
    if base is None and "width" not in params:
        raise ValueError(f"unknown SigLIP model {name!r}; known: {sorted(SIGLIP_MODELS)}")
    args = _override(base or {}, params, SigLIPConfig)
    if "mlp_ratio" in params:
        args["mlp_dim"] = int(args["width"] * params["mlp_ratio"])
    select_layer = params.get("select_layer", -1)
    if select_layer < -1:  # the reference keeps layers + select_layer + 1 blocks
        args["layers"] = args.get("layers", SigLIPConfig.layers) + select_layer + 1
    return SigLIPConfig(**args, gelu_approximate=gelu)


def sam_from_params(params: dict) -> SAMConfig:
    name = params.get("model_name", "")
    if name not in SAM_MODELS and "width" not in params:
        raise ValueError(f"unknown SAM model {name!r}; known: {sorted(SAM_MODELS)}")
    return SAMConfig(**_override(SAM_MODELS.get(name, {}), params, SAMConfig))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
def vl1_original_config(cfg: dict, image_token_id: int) -> VLConfig:
    vision, aligner = cfg["vision_config"], cfg["aligner_config"]
    params, aligner_params = vision.get("params", {}), aligner.get("params", {})
    # The reference builds `LlamaConfig(**language_config)`: omitted fields take Llama's defaults
    # (the 7B config sets only layers, vocab and context; hidden 4096 etc. come from here).
    language = LlamaConfig(**cfg["language_config"]).to_dict()
    common = dict(
        language=language,
        image_token_id=image_token_id,
        aligner_type=aligner_params.get("projector_type", "mlp_gelu"),
        aligner_depth=aligner_params.get("depth", 2),
    )
    if vision.get("cls") == "HybridVisionTower":
        high, low = params["high_res_cfg"], params["low_res_cfg"]
        return VLConfig(
            low=siglip_from_params(low, "none"),
            high=sam_from_params(high),
            low_mean=tuple(low.get("pixel_mean", SIGLIP_MEAN)),
            low_std=tuple(low.get("pixel_std", SIGLIP_STD)),
            high_mean=tuple(high.get("pixel_mean", CLIP_MEAN)),
            high_std=tuple(high.get("pixel_std", CLIP_STD)),
            **common,
        )
    if vision.get("cls") != "CLIPVisionTower" or not params.get("model_name", "").startswith("siglip"):
        raise ValueError(f"unsupported DeepSeek-VL vision tower {vision.get('cls')!r} / {params.get('model_name')!r}")
    return VLConfig(
        low=siglip_from_params(params, "none"),
        low_mean=tuple(params.get("pixel_mean") or SIGLIP_MEAN),
        low_std=tuple(params.get("pixel_std") or SIGLIP_STD),
        **common,
    )


def hf_siglip_config(v: dict) -> SigLIPConfig:
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in HF_GELU:
        raise ValueError(f"unsupported SigLIP activation {act!r}")
    return SigLIPConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 16),
        width=v.get("hidden_size", 768),
        layers=v.get("num_hidden_layers", 12),
        heads=v.get("num_attention_heads", 12),
        mlp_dim=v.get("intermediate_size", 3072),
        gelu_approximate=HF_GELU[act],
        eps=v.get("layer_norm_eps", 1e-6),
    )


def vl1_hf_config(cfg: dict, preprocessor: dict, tokenizer_image_id: int) -> VLConfig:
    language = dict(cfg["text_config"])
    # transformers' VL ports tie at the top level; the file then has no lm_head (see load_tensors).
    language["tie_word_embeddings"] = cfg.get("tie_word_embeddings", language.get("tie_word_embeddings", False))
    low = hf_siglip_config(cfg["vision_config"])
    common = dict(
        language=language,
        image_token_id=cfg.get("image_token_id", tokenizer_image_id),
        low=low,
        low_mean=tuple(preprocessor.get("image_mean", SIGLIP_MEAN)),
        low_std=tuple(preprocessor.get("image_std", SIGLIP_STD)),
    )
    if cfg["model_type"] == "deepseek_vl":
        return VLConfig(aligner_type="mlp_gelu", **common)
    s = cfg["high_res_vision_config"]
    out = s.get("output_channels", 256)
    high = SAMConfig(
        image_size=s.get("image_size", 1024),
        patch_size=s.get("patch_size", 16),
        width=s.get("hidden_size", 768),
        layers=s.get("num_hidden_layers", 12),
        heads=s.get("num_attention_heads", 12),
        mlp_dim=s.get("mlp_dim") or int(s.get("hidden_size", 768) * s.get("mlp_ratio", 4.0)),
        window_size=s.get("window_size", 14),
        global_attn_indexes=tuple(s.get("global_attn_indexes", (2, 5, 8, 11))),
        neck_channels=out,
        downsample_channels=(out * 2, out * 4),
        neck_resize=4 * low.grid,
        eps=s.get("layer_norm_eps", 1e-6),
    )
    return VLConfig(
        aligner_type="low_high_hybrid_split_mlp_gelu",
        high=high,
        high_mean=tuple(preprocessor.get("high_res_image_mean", CLIP_MEAN)),
        high_std=tuple(preprocessor.get("high_res_image_std", CLIP_STD)),
        **common,
    )


def vl2_config(cfg: dict, image_token_id: int) -> VL2Config:
    projector = cfg.get("projector_config", {})
    if projector.get("projector_type", "downsample_mlp_gelu") != "downsample_mlp_gelu":
        raise ValueError(f"unsupported VL2 projector {projector['projector_type']!r}")
    return VL2Config(
        language={**VL2_LANGUAGE_DEFAULTS, **cfg["language_config"]},
        image_token_id=image_token_id,
        vision=siglip_from_params(cfg["vision_config"], "tanh"),
        projector_depth=projector.get("depth", 2),
        projector_mlp_ratio=projector.get("mlp_ratio", 1),
        downsample_ratio=projector.get("downsample_ratio", 2),
        tile_tag=cfg.get("tile_tag", "2D"),
        global_view_pos=cfg.get("global_view_pos", "head"),
        candidate_resolutions=tuple(tuple(c) for c in cfg.get("candidate_resolutions", CANDIDATE_RESOLUTIONS)),
    )


# ---------------------------------------------------------------------------------------------
# transformers -> original tensor names
# ---------------------------------------------------------------------------------------------
def hf_siglip_to_timm(tensors: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """transformers `SiglipVisionModel` names under `src` -> timm names under `dst` (q/k/v fused)."""
    out = {}
    sub = {k[len(src) :]: v for k, v in tensors.items() if k.startswith(src)}
    layers = sorted({int(m.group(1)) for k in sub if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    out[dst + "patch_embed.proj.weight"] = sub.pop("embeddings.patch_embedding.weight")
    out[dst + "patch_embed.proj.bias"] = sub.pop("embeddings.patch_embedding.bias")
    out[dst + "pos_embed"] = sub.pop("embeddings.position_embedding.weight").unsqueeze(0)
    for i in layers:
        a, b = f"encoder.layers.{i}.", f"{dst}blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sub.pop(f"{a}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{b}attn.qkv.{kind}"] = torch.cat(qkv)
            for hf, timm_name in (
                ("self_attn.out_proj", "attn.proj"),
                ("layer_norm1", "norm1"),
                ("layer_norm2", "norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"{b}{timm_name}.{kind}"] = sub.pop(f"{a}{hf}.{kind}")
    for kind in ("weight", "bias"):
        out[f"{dst}norm.{kind}"] = sub.pop(f"post_layernorm.{kind}")
    leftover = [k for k in sub if not k.startswith("head.")]
    if leftover:
        raise CheckpointMismatchError(f"unexpected SigLIP tensors under {src}: {sorted(leftover)}")
    return out


HF_HYBRID_RENAMES = [
    (r"^model\.high_res_vision_model\.vision_encoder\.patch_embed\.projection\.", "patch_embed.proj."),
    (r"^model\.high_res_vision_model\.vision_encoder\.pos_embed$", "pos_embed"),
    (r"^model\.high_res_vision_model\.vision_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^model\.high_res_vision_model\.vision_encoder\.layers\.(\d+)\.", r"blocks.\1."),
    (r"^model\.high_res_vision_model\.vision_encoder\.neck\.", "neck."),
    (r"^model\.high_res_vision_neck\.", "neck_hd."),
    (r"^model\.high_res_vision_proj\.conv(\d)\.", lambda m: f"downsamples.{int(m.group(1)) - 1}."),
    (r"^model\.high_res_vision_alpha$", "hd_alpha_downsamples"),
]
NECK_RENAMES = {"conv1": "0", "layer_norm1": "1", "conv2": "2", "layer_norm2": "3"}


def hf_to_original(tensors: dict[str, torch.Tensor], hybrid: bool) -> dict[str, torch.Tensor]:
    out = {}
    low = "vision_model.vision_tower_low.vision_tower." if hybrid else "vision_model.vision_tower."
    out.update(hf_siglip_to_timm(tensors, "model.vision_model.", low))
    high = "vision_model.vision_tower_high.vision_tower."
    aligner = {
        "linear1": "layers.0",
        "linear2": "layers.2",
        "vision_proj": "low_up_proj",
        "high_res_vision_proj": "high_up_proj",
        "proj": "layers.1",
    }
    for key, value in tensors.items():
        if key.startswith("model.vision_model."):
            continue
        if key.startswith("model.language_model."):
            out["language_model.model." + key[len("model.language_model.") :]] = value
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value
        elif m := re.match(r"^model\.aligner\.(\w+)\.(weight|bias)$", key):
            out[f"aligner.{aligner[m.group(1)]}.{m.group(2)}"] = value
        else:
            for pattern, repl in HF_HYBRID_RENAMES:
                if re.match(pattern, key):
                    name = re.sub(pattern, repl, key)
                    if name.startswith(("neck.", "neck_hd.")):
                        head, part, rest = name.split(".", 2)
                        name = f"{head}.{NECK_RENAMES[part]}.{rest}"
                    out[high + name] = value
                    break
            else:
                out[key] = value  # reported as unexpected by load_tensors
    return out


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def materialize(cls, cfg, device, dtype) -> VisionLanguageModel:
    """Build on the meta device and allocate once in the target dtype: no fp32 copy, no random init.

    Every parameter is then overwritten by the strict loads; the core keeps its fp32 buffers.
    """
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device=torch.device(device or "cpu")).to(dtype or torch.float32)
    lm = model.lm
    if lm.config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return model


def load_tensors(model: VisionLanguageModel, tensors: dict[str, torch.Tensor], lm_prefix: str) -> None:
    """Vision/projector tensors by exact name (one error lists every problem), the rest to the core."""
    lm_tensors = {k[len(lm_prefix) :]: v for k, v in tensors.items() if k.startswith(lm_prefix)}
    own = {k: v for k, v in tensors.items() if not k.startswith(lm_prefix) and not UNUSED_KEYS.search(k)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(lm_prefix)}
    for k, v in own.items():  # a scalar stored as () or (1,)
        if k in expected and v.numel() == 1 == expected[k].numel():
            own[k] = v.reshape(expected[k].shape)
    check_tensors(expected, own, "vision/projector tensors do not match the config")
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(own[k])
    model.lm.load_hf_state_dict(lm_tensors)


def add_pad_token(tokenizer, pad_token: str | None, vocab_size: int) -> None:
    """Give a tokenizer without a pad token the one `processor_config.json` names, as DeepSeek-VL2 does.

    Without it, batches are left-padded with EOS, and the repetition penalty, which counts the padding
    as seen tokens, then penalises EOS in padded rows only. A token missing from the vocabulary gets the
    next id; when that id (or an existing one) is outside the model's embedding table of `vocab_size`
    rows, nothing is added and padding falls back to EOS as before.
    """
    if tokenizer.pad_token is not None or not pad_token:
        return
    existing = tokenizer.convert_tokens_to_ids(pad_token)
    pad_id = existing if existing is not None and existing != tokenizer.unk_token_id else len(tokenizer)
    if pad_id < vocab_size:
        tokenizer.add_special_tokens({"pad_token": pad_token})


def load(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    tag_policy: str = "error",
) -> tuple[VisionLanguageModel, VLChatProcessor | VL2ChatProcessor]:
    """Load a DeepSeek-VL / VL2 checkpoint folder (safetensors + config + tokenizer files)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json")
    cfg = _json(path / "config.json")
    preprocessor = _json(path / "preprocessor_config.json") | _json(path / "processor_config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    kind = cfg.get("model_type")
    tensors = read_safetensors(path)
    opts = dict(max_pixels=max_pixels, tag_policy=tag_policy)

    if kind in ("multi_modality", "deepseek_vl", "deepseek_vl_hybrid"):
        tokenizer_image_id = token_id(tokenizer, VLChatProcessor.image_tag)
        if kind == "multi_modality":
            vcfg = vl1_original_config(cfg, tokenizer_image_id)
        else:
            vcfg = vl1_hf_config(cfg, preprocessor, tokenizer_image_id)
            tensors = hf_to_original(tensors, hybrid=kind == "deepseek_vl_hybrid")
        model = materialize(DeepseekVL, vcfg, device, dtype)
        load_tensors(model, tensors, "language_model.")
        hybrid = vcfg.high is not None
        mean = vcfg.high_mean if hybrid else vcfg.low_mean
        image_processor = VLImageProcessor(
            image_size=vcfg.image_size,
            min_size=preprocessor.get("min_size", 14),
            background=tuple(preprocessor.get("background_color") or background_color(mean)),
        )
        processor = VLChatProcessor(tokenizer, image_processor, vcfg.num_image_tokens, **opts)
        if processor.image_token_id != vcfg.image_token_id:
            raise ValueError(
                f"config image_token_id {vcfg.image_token_id} is not the tokenizer's <image_placeholder> "
                f"id {processor.image_token_id}"
            )
    elif kind == "deepseek_vl_v2":
        image_tag = preprocessor.get("image_token", VL2ChatProcessor.image_tag)
        if image_tag != VL2ChatProcessor.image_tag:
            raise ValueError(f"unsupported VL2 image token {image_tag!r}")
        vcfg = vl2_config(cfg, token_id(tokenizer, image_tag))
        model = materialize(DeepseekVL2, vcfg, device, dtype)
        load_tensors(model, tensors, "language.")
        add_pad_token(tokenizer, preprocessor.get("pad_token"), model.lm.get_input_embeddings().num_embeddings)
        image_processor = VL2ImageProcessor(
            tile_size=vcfg.vision.image_size,
            patch_size=vcfg.vision.patch_size,
            downsample_ratio=vcfg.downsample_ratio,
            candidate_resolutions=vcfg.candidate_resolutions,
            mean=tuple(preprocessor.get("image_mean", SIGLIP_MEAN)),
            std=tuple(preprocessor.get("image_std", SIGLIP_STD)),
        )
        processor = VL2ChatProcessor(tokenizer, image_processor, **opts)
    else:
        raise ValueError(f"{path}: model_type {kind!r} is not a DeepSeek-VL/VL2 checkpoint")
    return model.eval(), processor
