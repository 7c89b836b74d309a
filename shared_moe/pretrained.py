"""`from_pretrained`: a Hugging Face checkpoint folder -> a ready `MoEForCausalLM`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import fp8_block_size, mtp_layer_count, read_safetensors, strip_language_prefix
from .config import MoEConfig
from .model import MoEForCausalLM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = ("auto", *_DTYPES)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.bfloat16"); None or "auto" stay None,
    which `from_pretrained` reads as the checkpoint's own dtype (transformers' `dtype="auto"`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else None
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected a torch.dtype, None, or one of {list(DTYPE_NAMES)}")
    return _DTYPES[name]


def _default_dtype(config: MoEConfig, raw_config: dict, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The checkpoint's own precision; FP8 checkpoints become bf16 (weights are dequantised on load)."""
    if (raw_config.get("quantization_config") or {}).get("quant_method") == "fp8":
        return torch.bfloat16
    if config.torch_dtype in _DTYPES:
        return _DTYPES[config.torch_dtype]
    float_dtypes = [t.dtype for t in tensors.values() if t.dtype in _DTYPES.values()]
    return max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.bfloat16


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    allow_pickle: bool = False,
    load_mtp: bool = True,
) -> MoEForCausalLM:
    """Load a DeepSeek LLM / DeepSeekMoE / V2 / V3 / VL2-language checkpoint from a local folder.

    dtype (a torch.dtype or its name) defaults to the checkpoint's dtype, as does "auto" (bf16 for FP8
    checkpoints, dequantised in blocks of their `quantization_config.weight_block_size`); device defaults to CPU.
    Multi-token-prediction layers are loaded when the checkpoint has them and `load_mtp` is set.
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face checkpoint folder")
    raw_config = json.loads((path / "config.json").read_text())
    config = MoEConfig.from_hf(raw_config)
    tensors = read_safetensors(path, allow_pickle=allow_pickle)
    tensors = strip_language_prefix(tensors)  # VL2: the LM lives under `language.` beside the vision tower
    dtype = dtype or _default_dtype(config, raw_config, tensors)
    device = torch.device(device or "cpu")
    num_mtp = mtp_layer_count(tensors, config.num_hidden_layers) if load_mtp else 0
    if num_mtp and not config.num_nextn_predict_layers:
        raise ValueError(f"{path}: checkpoint has layers past num_hidden_layers but the config declares no MTP layers")

    with torch.device("meta"):
        model = MoEForCausalLM(config, num_mtp_layers=num_mtp)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.load_hf_state_dict(tensors, fp8_block_size(raw_config))
    return model.eval()
