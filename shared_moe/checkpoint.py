"""Reading Hugging Face checkpoints into our modules.

Handles what released DeepSeek checkpoints actually contain: single or sharded safetensors,
per-expert (`mlp.experts.{e}.gate_proj.weight`) or fused (`mlp.experts.gate_up_proj`) expert keys,
the `language.` prefix of DeepSeek-VL2, FP8 e4m3 weights with `weight_scale_inv` block scales (blocks of
`quantization_config.weight_block_size`, 128x128 in DeepSeek-V3), and
the multi-token-prediction layers stored after the last decoder layer. Pickle `.bin` files are
refused unless the caller opts in, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

FP8_BLOCK_SIZE = (128, 128)  # DeepSeek-V3's quantization_config.weight_block_size, and transformers' default
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_VL2_NON_LANGUAGE = ("vision.", "projector.", "image_newline", "view_seperator")
_SAFETENSORS_INDEX, _PICKLE_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


def read_safetensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: a .safetensors file, or a folder (single file or sharded with an index)."""
    path = Path(path)
    files = _checkpoint_files(path, allow_pickle)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".bin":
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
            continue
        tensors.update(_read_safetensors_file(file))
    return tensors


def _read_safetensors_file(file: Path) -> dict[str, torch.Tensor]:
    """One file's tensors; safetensors' own errors do not say which shard of a checkpoint is broken."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise OSError(f"cannot read {file}: {error}. The file is truncated or corrupt; download it again") from error


def _indexed_shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names (none if there is no index)."""
    if not index.exists():
        return []
    return [index.parent / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]


def _checkpoint_files(path: Path, allow_pickle: bool) -> list[Path]:
    """Safetensors before pickle files, as transformers prefers them; a sharded save's index before globbing."""
    if path.is_file():
        if path.suffix == ".bin" and not allow_pickle:
            raise ValueError(f"{path} is a pickle checkpoint; pass allow_pickle=True only if you trust its source")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    files = (_indexed_shards(path / _SAFETENSORS_INDEX) or sorted(path.glob("*.safetensors"))
             or _indexed_shards(path / _PICKLE_INDEX) or sorted(path.glob("pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or *.bin) weights in {path}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint index in {path} names missing shards: {missing}")
    if any(f.suffix == ".bin" for f in files) and not allow_pickle:
        raise ValueError(
            f"{path} holds pickle (.bin) weights; convert them to safetensors, or pass allow_pickle=True "
            "only if you trust their source (unpickling can run code)"
        )
    return files


def fp8_block_size(hf_config: dict) -> tuple[int, int]:
    """The (rows, cols) scale block of a config.json's `quantization_config.weight_block_size`, 128x128 when absent."""
    block = (hf_config.get("quantization_config") or {}).get("weight_block_size") or FP8_BLOCK_SIZE
    if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return tuple(block)


def fp8_scale_mismatch(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: Sequence[int]) -> str | None:
    """Why `scale_inv` is not the per-block scale grid of `weight`, or None when it is.

    Cropping or broadcasting a scale of another shape would load wrong values without a word.
    """
    if weight.ndim != 2:
        return f"the weight of shape {tuple(weight.shape)} is not a matrix"
    rows, cols = weight.shape
    expected = (-(-rows // block_size[0]), -(-cols // block_size[1]))
    if tuple(scale_inv.shape) != expected:
        return (
            f"scale of shape {tuple(scale_inv.shape)}, expected {expected} for a {rows}x{cols} weight in "
            f"{block_size[0]}x{block_size[1]} blocks (quantization_config.weight_block_size)"
        )
    return None


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block_size: Sequence[int] = FP8_BLOCK_SIZE
) -> torch.Tensor:
    """FP8 weight times its per-block scale (ceil(rows/b0), ceil(cols/b1)); edge blocks are cropped."""
    mismatch = fp8_scale_mismatch(weight, scale_inv, block_size)
    if mismatch:
        raise ValueError(mismatch)
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block_size[0], 0).repeat_interleave(block_size[1], 1)[:rows, :cols]
    return (weight.float() * scale).to(dtype)


def strip_language_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek-VL2 stores the LM under `language.`; vision tower, projector and tile tags are dropped here."""
    if not any(k.startswith("language.") for k in tensors):
        return tensors
    return {
        k.removeprefix("language."): v
        for k, v in tensors.items()
        if k.startswith("language.") or not k.startswith(_VL2_NON_LANGUAGE)
    }


def dequantize_all(
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    problems: list[str],
    block_size: Sequence[int] = FP8_BLOCK_SIZE,
) -> dict[str, torch.Tensor]:
    """Every weight with a fitting `weight_scale_inv` becomes `dtype`: its values times their block's scale.

    Recorded in `problems`, and dropped, so the final report lists them: a scale without its weight, a scale whose
    shape is not the weight's block grid, and an FP8 weight without a scale (unscaled, its values are meaningless).
    """
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        weight_key = key.removesuffix("_scale_inv")
        scale = out.pop(key)
        if weight_key not in out:
            problems.append(f"{key} has no matching {weight_key}")
            continue
        mismatch = fp8_scale_mismatch(out[weight_key], scale, block_size)
        if mismatch:
            problems.append(f"{key}: {mismatch}")
            del out[weight_key]
            continue
        out[weight_key] = dequantize_fp8(out[weight_key], scale, dtype, block_size)
    for key in [k for k, v in out.items() if v.dtype in _FP8_DTYPES]:
        problems.append(f"{key} is FP8 ({out.pop(key).dtype}) but has no {key}_scale_inv")
    return out


def fuse_experts(tensors: dict[str, torch.Tensor], problems: list[str]) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down matrices -> fused gate_up_proj (E, 2I, d) and down_proj (E, d, I).

    A layer whose experts are incomplete or of unequal shapes is recorded in `problems` and left unfused,
    so the final report also lists its fused keys as missing.
    """
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out = {}
    for key, value in tensors.items():
        match = _EXPERT_KEY.match(key)
        if match:
            prefix, expert, proj = match.groups()
            groups[prefix][proj][int(expert)] = value
        else:
            out[key] = value
    for prefix, projs in groups.items():
        num = max(max(v) for v in projs.values()) + 1
        if set(projs) != {"gate", "up", "down"} or {len(v) for v in projs.values()} != {num}:
            have = {p: sorted(v) for p, v in projs.items()}
            problems.append(f"{prefix}: incomplete per-expert weights, found experts {have}")
            continue
        shapes = {p: {tuple(t.shape) for t in v.values()} for p, v in projs.items()}
        if any(len(s) > 1 for s in shapes.values()) or shapes["gate"] != shapes["up"]:
            problems.append(f"{prefix}: experts of unequal shapes {dict(sorted(shapes.items()))}")
            continue
        gate = torch.stack([projs["gate"][e] for e in range(num)])
        up = torch.stack([projs["up"][e] for e in range(num)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack([projs["down"][e] for e in range(num)])
    return out


def mtp_layer_count(tensors: dict[str, torch.Tensor], num_hidden_layers: int) -> int:
    """How many MTP modules the checkpoint holds (layers numbered num_hidden_layers and above)."""
    indices = {int(m.group(1)) for k in tensors if (m := _LAYER_KEY.match(k)) and int(m.group(1)) >= num_hidden_layers}
    return len(indices)


def rename_mtp_layers(tensors: dict[str, torch.Tensor], num_hidden_layers: int, keep: bool) -> dict[str, torch.Tensor]:
    """`model.layers.{L + k}.*` -> `mtp_layers.{k}.*`; their copy of the shared embedding is dropped."""
    out = {}
    for key, value in tensors.items():
        match = _LAYER_KEY.match(key)
        if not match or int(match.group(1)) < num_hidden_layers:
            out[key] = value
            continue
        rest = match.group(2)
        if keep and rest != "embed_tokens.weight":
            out[f"mtp_layers.{int(match.group(1)) - num_hidden_layers}.{rest}"] = value
    return out


def check_tensors(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], title: str, problems: Sequence[str] = ()
) -> None:
    """Raise one CheckpointMismatchError listing every missing, unexpected and mis-shaped tensor.

    `problems` are what earlier conversion steps (FP8 scales, expert fusing) could not make sense of.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    parts = [
        f"{len(items)} {label}:\n  " + "\n  ".join(items)
        for label, items in (
            ("unusable", list(problems)),
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        )
        if items
    ]
    if parts:
        raise CheckpointMismatchError(title + "\n" + "\n".join(parts))


def load_into(
    model: nn.Module, tensors: dict[str, torch.Tensor], weight_block_size: Sequence[int] = FP8_BLOCK_SIZE
) -> None:
    """Check names and shapes against the model, then copy. One error lists every problem.

    `weight_block_size` is the FP8 scale block of the checkpoint (see `fp8_block_size`).
    """
    config = model.config
    dtype = model.dtype
    problems: list[str] = []
    target_dtype = dtype if dtype.is_floating_point else torch.bfloat16
    tensors = fuse_experts(
        dequantize_all(strip_language_prefix(tensors), target_dtype, problems, weight_block_size), problems
    )
    tensors = rename_mtp_layers(tensors, config.num_hidden_layers, keep=len(model.mtp_layers) > 0)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
        # One shared parameter answers to both names; the embedding is the source of truth.
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    for k in range(len(model.mtp_layers)):
        # V3 stores a copy of lm_head as the MTP head; fall back to sharing it when absent.
        head = f"mtp_layers.{k}.shared_head.head.weight"
        if head not in tensors and "lm_head.weight" in tensors:
            tensors[head] = tensors["lm_head.weight"]

    expected = model.state_dict()
    check_tensors(expected, tensors, "checkpoint does not match the model config", problems)
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the key layout of released checkpoints (per-expert, MTP at model.layers.{L+k})."""
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if key.startswith("mtp_layers."):
            index, rest = key.removeprefix("mtp_layers.").split(".", 1)
            key = f"model.layers.{config.num_hidden_layers + int(index)}.{rest}"
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            for expert, fused in enumerate(value):
                gate, up = fused.chunk(2)
                out[f"{prefix}.{expert}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{expert}.up_proj.weight"] = up.contiguous()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            for expert, down in enumerate(value):
                out[f"{prefix}.{expert}.down_proj.weight"] = down.contiguous()
        else:
            out[key] = value.contiguous()
    for k in range(len(model.mtp_layers)):
        out[f"model.layers.{config.num_hidden_layers + k}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
    return out


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write config.json + model.safetensors that transformers and `from_pretrained` both load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    # Shared storage (tied embeddings, MTP embedding copy) must be written as separate tensors.
    seen: set[int] = set()
    for key, value in tensors.items():
        if value.data_ptr() in seen:
            tensors[key] = value.clone()
        seen.add(tensors[key].data_ptr())
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _remove_stale_index(path, keep="model.safetensors")
    config = model.config.to_hf_dict()
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    config["num_nextn_predict_layers"] = len(model.mtp_layers)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _remove_stale_index(path: Path, keep: str) -> None:
    """Delete an earlier sharded safetensors save's index and the shards it names: `read_safetensors` prefers
    that index to the new `keep` file, so a reload would get the old weights. Only files directly inside
    `path` go; pickle (.bin) files are left alone, as the new safetensors file takes precedence over them."""
    index = path / _SAFETENSORS_INDEX
    if not index.exists():
        return
    for shard in set(json.loads(index.read_text())["weight_map"].values()) - {keep}:
        if Path(shard).name == shard and (path / shard).is_file():
            (path / shard).unlink()
    index.unlink()
