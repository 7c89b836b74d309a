"""Checkpoint formats: FP8 blocks, sharding, VL2 prefix, MTP layers, clear errors, pickle refusal."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import shared_moe
from shared_moe.checkpoint import (
    FP8_BLOCK_SIZE,
    CheckpointMismatchError,
    dequantize_fp8,
    fp8_block_size,
    read_safetensors,
)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = FP8_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block quantiser: per block (128x128 by default), scale = amax / 448 (e4m3 max)."""
    rows, cols = weight.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(br * block[0], bc * block[1])
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(br, block[0], bc, block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_dequantisation_of_non_multiple_of_128_shape():
    weight = (torch.randn(200, 300, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    q, scale = quantize_fp8(weight)
    assert scale.shape == (2, 3)
    restored = dequantize_fp8(q, scale, torch.bfloat16)
    assert restored.shape == (200, 300) and restored.dtype == torch.bfloat16
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step 2^-9 (scaled).
    step = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300] * 2.0**-9
    error = (restored.float() - weight.float()).abs()
    bound = weight.float().abs() * 2.0**-4 + step + weight.float().abs() * 2.0**-8
    assert bool((error <= bound).all())
    assert error.max() > 0  # it really went through FP8


def loaded_weight(model: torch.nn.Module, key: str) -> torch.Tensor:
    """A checkpoint key's tensor in the loaded model; per-expert keys index the fused expert tensors."""
    match = re.match(r"(.+\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", key)
    if not match:
        return model.get_parameter(key)
    prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
    if proj == "down":
        return model.get_parameter(f"{prefix}.down_proj")[expert]
    gate, up = model.get_parameter(f"{prefix}.gate_up_proj")[expert].chunk(2)
    return gate if proj == "gate" else up


FP8_KEY = "model.layers.0.mlp.down_proj.weight"  # (200, 300): edge blocks in both directions


def fp8_checkpoint(tiny_checkpoint, block: tuple[int, int] = FP8_BLOCK_SIZE, write_block_size: bool = True):
    """A tiny V3 checkpoint with every projection block-quantised like DeepSeek-V3's release.

    Returns (folder, the tensors written, the bf16 originals); re-save the tensors after changing them.
    """
    _, folder = tiny_checkpoint("v3", hidden_size=200, intermediate_size=300, num_attention_heads=4)
    tensors = load_file(folder / "model.safetensors")
    originals = {}
    for key in [k for k, v in tensors.items() if v.ndim == 2 and "proj" in k and "layernorm" not in k]:
        originals[key] = tensors[key].to(torch.bfloat16)
        tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(originals[key], block)
    assert tensors[FP8_KEY].shape == (200, 300)
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}
    if write_block_size:
        config["quantization_config"]["weight_block_size"] = list(block)
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, tensors, originals


@pytest.mark.parametrize(
    "block,write_block_size", [((128, 128), True), ((128, 128), False), ((64, 32), True)],
    ids=["128x128", "absent-128x128", "64x32"],
)
def test_fp8_checkpoint_loads_to_bf16_values_in_its_block_size(tiny_checkpoint, block, write_block_size):
    """Blocks of quantization_config.weight_block_size (128x128 when absent, as in DeepSeek-V3)."""
    folder, tensors, originals = fp8_checkpoint(tiny_checkpoint, block, write_block_size)
    model = shared_moe.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    for key, original in originals.items():
        loaded = loaded_weight(model, key).float()
        expected = dequantize_fp8(tensors[key], tensors[key + "_scale_inv"], torch.bfloat16, block).float()
        assert torch.equal(loaded, expected), key
        assert (loaded - original.float()).abs().max() <= original.float().abs().max() * 2.0**-4 + 1e-6


def test_fp8_weight_without_its_scale_is_reported(tiny_checkpoint):
    folder, tensors, _ = fp8_checkpoint(tiny_checkpoint)
    del tensors[FP8_KEY + "_scale_inv"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"{FP8_KEY} is FP8 (torch.float8_e4m3fn) but has no")):
        shared_moe.from_pretrained(folder)


@pytest.mark.parametrize("scale_shape", [(5, 5), (1, 2), (6,), ()], ids=["larger", "smaller", "1d", "scalar"])
def test_fp8_scale_of_the_wrong_shape_is_reported(tiny_checkpoint, scale_shape):
    """Cropping a larger grid, or broadcasting a per-tensor scale, would load wrong values silently."""
    folder, tensors, _ = fp8_checkpoint(tiny_checkpoint)
    tensors[FP8_KEY + "_scale_inv"] = torch.ones(scale_shape)
    save_file(tensors, folder / "model.safetensors")
    expected = f"{FP8_KEY}_scale_inv: scale of shape {scale_shape}, expected (2, 3) for a 200x300 weight"
    with pytest.raises(CheckpointMismatchError, match=re.escape(expected)):
        shared_moe.from_pretrained(folder)


def test_fp8_scale_grid_follows_the_block_size_and_bad_block_sizes_raise():
    q, scale = quantize_fp8(torch.randn(200, 300), (64, 64))
    with pytest.raises(ValueError, match=re.escape("expected (2, 3) for a 200x300 weight in 128x128 blocks")):
        dequantize_fp8(q, scale, torch.bfloat16)
    assert fp8_block_size({"quantization_config": {"weight_block_size": [64, 32]}}) == (64, 32)
    assert fp8_block_size({}) == (128, 128)
    with pytest.raises(ValueError, match="weight_block_size must be two positive integers"):
        fp8_block_size({"quantization_config": {"weight_block_size": [128]}})


def test_sharded_checkpoint_with_index(tiny_checkpoint, tmp_path):
    hf, folder = tiny_checkpoint("v3")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a, b = shared_moe.from_pretrained(folder), shared_moe.from_pretrained(sharded)
    ids = torch.randint(2, 96, (1, 9))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_truncated_shard_error_names_the_file(tmp_path):
    save_file({"a": torch.zeros(4), "b": torch.ones(8)}, tmp_path / "model-00001-of-00001.safetensors")
    shard = tmp_path / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # an interrupted download
    with pytest.raises(OSError, match="model-00001-of-00001.safetensors") as error:
        read_safetensors(tmp_path)
    assert isinstance(error.value.__cause__, SafetensorError)


def test_saving_over_a_sharded_checkpoint_replaces_it(tiny_checkpoint, tmp_path):
    """The old index would win over the new model.safetensors on reload, so it goes with the shards it names."""
    hf, _ = tiny_checkpoint("v3")
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="100KB")
    model = shared_moe.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.glob("*.safetensors*")) == ["model.safetensors"]
    assert (shared_moe.from_pretrained(folder).lm_head.weight == 0).all()


def test_stale_index_cleanup_deletes_only_the_named_files_in_the_folder(tiny_checkpoint, tmp_path):
    _, source = tiny_checkpoint("llama")
    folder, outside = tmp_path / "target", tmp_path / "outside.safetensors"
    folder.mkdir()
    for file in (outside, folder / "model-00001-of-00001.safetensors", folder / "notes.safetensors"):
        file.write_bytes(b"old")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "../outside.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shared_moe.from_pretrained(source).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.safetensors"]
    assert outside.exists()


def test_safetensors_take_precedence_over_a_pickle_index(tiny_checkpoint, tmp_path):
    """A folder with both keeps its .bin files; the loader reads the safetensors, as transformers does."""
    hf, source = tiny_checkpoint("llama")
    model = shared_moe.from_pretrained(source)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    model.save_pretrained(tmp_path)
    reloaded = shared_moe.from_pretrained(tmp_path)
    assert (tmp_path / "pytorch_model.bin").exists()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.bfloat16"])
def test_from_pretrained_takes_a_dtype_or_its_name(tiny_checkpoint, dtype):
    _, folder = tiny_checkpoint("llama")
    assert shared_moe.from_pretrained(folder, dtype=dtype).dtype == torch.bfloat16


def test_dtype_auto_is_the_checkpoints_and_unknown_names_raise(tiny_checkpoint):
    _, folder = tiny_checkpoint("llama")
    assert shared_moe.from_pretrained(folder, dtype="auto").dtype == torch.float32  # what transformers saved
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        shared_moe.from_pretrained(folder, dtype="bf16")


def test_vl2_language_prefix_and_config(tiny_checkpoint, tmp_path):
    hf, folder = tiny_checkpoint("v2")
    tensors = {f"language.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    tensors["vision.blocks.0.attn.qkv.weight"] = torch.zeros(4, 4)
    tensors["image_newline"] = torch.zeros(64)
    tensors["view_seperator"] = torch.zeros(64)
    vl2 = tmp_path / "vl2"
    vl2.mkdir()
    save_file(tensors, vl2 / "model.safetensors")
    language = json.loads((folder / "config.json").read_text())
    (vl2 / "config.json").write_text(json.dumps({"model_type": "deepseek_vl_v2", "language_config": language}))
    ours = shared_moe.from_pretrained(vl2, dtype=torch.float32)
    ids = torch.randint(2, 96, (1, 9))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-5


def test_mismatched_checkpoint_lists_every_problem(tiny_checkpoint):
    _, folder = tiny_checkpoint("v3")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    tensors["model.layers.0.surprise.weight"] = torch.zeros(3)
    tensors["lm_head.weight"] = torch.zeros(5, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        shared_moe.from_pretrained(folder)
    message = str(info.value)
    assert "model.norm.weight" in message and "model.layers.0.surprise.weight" in message
    assert "lm_head.weight: checkpoint (5, 64)" in message


def test_expert_and_fp8_problems_are_reported_together_with_the_rest(tiny_checkpoint):
    _, folder = tiny_checkpoint("v3")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    tensors["model.layers.1.mlp.experts.3.down_proj.weight"] = torch.zeros(64, 31)
    tensors["model.layers.1.self_attn.ghost.weight_scale_inv"] = torch.ones(1, 1)
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        shared_moe.from_pretrained(folder)
    message = str(info.value)
    assert "model.layers.2.mlp.experts: incomplete per-expert weights" in message
    assert "model.layers.1.mlp.experts: experts of unequal shapes" in message and "(64, 31)" in message
    assert "model.layers.1.self_attn.ghost.weight_scale_inv has no matching" in message
    assert "model.norm.weight" in message and "model.layers.2.mlp.experts.gate_up_proj" in message


def test_pickle_weights_refused_unless_opted_in(tiny_checkpoint, tmp_path):
    hf, folder = tiny_checkpoint("llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        shared_moe.from_pretrained(pickled)
    model = shared_moe.from_pretrained(pickled, allow_pickle=True)
    ids = torch.randint(2, 96, (1, 5))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < 1e-5


def test_mtp_layer_loads_and_is_skipped_on_request(tiny_checkpoint, add_mtp_layer):
    _, folder = tiny_checkpoint("v3")
    add_mtp_layer(folder)
    model = shared_moe.from_pretrained(folder)
    assert len(model.mtp_layers) == 1
    assert len(shared_moe.from_pretrained(folder, load_mtp=False).mtp_layers) == 0


@pytest.mark.parametrize("kind", ["v3", "v2", "llama"])
def test_save_pretrained_round_trips_and_transformers_loads_it(tiny_checkpoint, add_mtp_layer, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    _, folder = tiny_checkpoint(kind, **({"num_nextn_predict_layers": 1} if kind == "v3" else {}))
    if kind == "v3":
        add_mtp_layer(folder)
    model = shared_moe.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    again = shared_moe.from_pretrained(tmp_path / "saved")
    assert len(again.mtp_layers) == len(model.mtp_layers)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(2, 96, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_tied_embeddings_load_and_stay_tied(tiny_checkpoint):
    hf, folder = tiny_checkpoint("llama", tie_word_embeddings=True)
    model = shared_moe.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(2, 96, (1, 6))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < 1e-5
