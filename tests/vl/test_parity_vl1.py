"""DeepSeek-VL (v1) against transformers' ports on tiny random configs (issue point 1).

The checkpoints are written by transformers' own `save_pretrained` and loaded through `vl.load`; both
sides see the same pixels: our [0, 1] tensor, normalised (and for the hybrid's low branch, resized)
for transformers exactly as our towers do internally.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessor,
)

import vl

SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
    hidden_act="gelu",
)
SAM = dict(
    model_type="sam_vision_model",
    hidden_size=32,
    output_channels=16,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=160,
    patch_size=16,
    global_attn_indexes=[1, 3],
    window_size=4,
    mlp_dim=64,
)
LOW_MEAN, LOW_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
HIGH_MEAN, HIGH_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalize(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _save(vlh, tmp_path, hybrid: bool, tie: bool, siglip_act: str = "gelu_pytorch_tanh"):
    tokenizer = vlh.make_tokenizer(tmp_path, vlh.VL1_SPECIALS)
    image_id = tokenizer.convert_tokens_to_ids("<image_placeholder>")
    text = vlh.llama_text_config(vlh.padded_vocab(tokenizer))
    if hybrid:
        cfg = DeepseekVLHybridConfig(
            text_config=text,
            vision_config=SIGLIP,
            high_res_vision_config=SAM,
            image_token_id=image_id,
            tie_word_embeddings=tie,
        )
        ref = DeepseekVLHybridForConditionalGeneration(cfg)
        DeepseekVLHybridImageProcessor(
            size={"height": 64, "width": 64},
            high_res_size={"height": 160, "width": 160},
            image_mean=LOW_MEAN,
            image_std=LOW_STD,
            high_res_image_mean=HIGH_MEAN,
            high_res_image_std=HIGH_STD,
        ).save_pretrained(str(tmp_path))
    else:
        cfg = DeepseekVLConfig(
            text_config=text,
            vision_config={**SIGLIP, "hidden_act": siglip_act},
            image_token_id=image_id,
            tie_word_embeddings=tie,
        )
        ref = DeepseekVLForConditionalGeneration(cfg)
    vlh.randomize(ref, seed=1)
    if hybrid:
        with torch.no_grad():
            ref.model.high_res_vision_alpha.fill_(0.5)  # exercise the neck_hd branch
    ref.save_pretrained(str(tmp_path))
    return ref.eval()


def _reference_logits(ref, batch, hybrid: bool):
    x = batch.pixel_values[:, 0]
    if hybrid:
        low = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
        kwargs = dict(
            pixel_values=_normalize(low, LOW_MEAN, LOW_STD), high_res_pixel_values=_normalize(x, HIGH_MEAN, HIGH_STD)
        )
    else:
        kwargs = dict(pixel_values=_normalize(x, LOW_MEAN, LOW_STD))
    with torch.no_grad():
        return ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits


@pytest.mark.parametrize("hybrid,tie", [(True, True), (True, False), (False, True)])
def test_logits_match_transformers(vlh, tmp_path, hybrid, tie):
    ref = _save(vlh, tmp_path, hybrid, tie)
    model, processor = vl.load(tmp_path)
    assert isinstance(model, vl.DeepseekVL) and (model.cfg.high is not None) == hybrid
    assert processor.num_image_tokens == 16
    conv = [{"role": "user", "content": "<image_placeholder>Describe the image."}]
    batch = processor(conv, [vlh.noise_image(120, 90, seed=3)])
    assert batch.pixel_values.shape == (
        1,
        1,
        3,
        processor.image_processor.image_size,
        processor.image_processor.image_size,
    )
    assert int(batch.images_seq_mask.sum()) == 16
    with torch.no_grad():
        ours = model(batch).logits
    theirs = _reference_logits(ref, batch, hybrid)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4
    # The image actually matters: other pixels give other logits.
    other = processor(conv, [vlh.noise_image(120, 90, seed=4)])
    with torch.no_grad():
        assert (model(other).logits - ours).abs().max() > 1e-3


def test_hd_alpha_is_loaded_not_hardcoded(vlh, tmp_path):
    _save(vlh, tmp_path, hybrid=True, tie=True)
    model, _ = vl.load(tmp_path)
    assert model.vision_model.vision_tower_high.vision_tower.hd_alpha_downsamples.item() == 0.5


def _original_config(model: vl.DeepseekVL) -> dict:
    """The original `multi_modality` config.json for a loaded hybrid model (explicit tiny dims)."""
    cfg = model.cfg
    low, high = cfg.low, cfg.high
    low_params = dict(
        model_name="siglip_large_patch16_384",
        image_size=low.image_size,
        patch_size=low.patch_size,
        width=low.width,
        layers=low.layers,
        heads=low.heads,
        mlp_dim=low.mlp_dim,
        select_layer=-1,
        pixel_mean=list(cfg.low_mean),
        pixel_std=list(cfg.low_std),
    )
    if high is None:
        high_params = None
    else:
        high_params = dict(
            model_name="sam_b_downsample",
            image_size=high.image_size,
            width=high.width,
            layers=high.layers,
            heads=high.heads,
            mlp_dim=high.mlp_dim,
            window_size=high.window_size,
            global_attn_indexes=list(high.global_attn_indexes),
            neck_channels=high.neck_channels,
            downsample_channels=list(high.downsample_channels),
            neck_resize=high.neck_resize,
            pixel_mean=list(cfg.high_mean),
            pixel_std=list(cfg.high_std),
        )
    if high is None:
        vision = {"cls": "CLIPVisionTower", "params": low_params}
        aligner = {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 32, "n_embed": 64}
    else:
        vision = {"cls": "HybridVisionTower", "params": {"high_res_cfg": high_params, "low_res_cfg": low_params}}
        aligner = {"projector_type": "low_high_hybrid_split_mlp_gelu", "depth": 2, "input_dim": 32, "n_embed": 64}
    return {
        "model_type": "multi_modality",
        "vision_config": vision,
        "aligner_config": {"cls": "MlpProjector", "params": aligner},
        "language_config": {**cfg.language, "tie_word_embeddings": False},
    }


@pytest.mark.parametrize("hybrid", [True, False], ids=["7B-hybrid", "1.3B-siglip"])
def test_original_layout_round_trip(vlh, tmp_path, hybrid):
    """HF layout -> our model -> original DeepSeek-VL layout on disk -> `vl.load` -> same logits."""
    import json
    import shutil

    from safetensors.torch import save_file

    hf_dir, orig_dir = tmp_path / "hf", tmp_path / "orig"
    hf_dir.mkdir()
    _save(vlh, hf_dir, hybrid=hybrid, tie=False, siglip_act="gelu")  # the original SigLIP-L uses exact GELU
    model, processor = vl.load(hf_dir)
    orig_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, orig_dir / name)
    (orig_dir / "config.json").write_text(json.dumps(_original_config(model)))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    # Shipped checkpoints also hold modules the reference builds but never runs; they must be ignored.
    if hybrid:
        tensors["vision_model.vision_tower_low.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, 32)
        tensors["vision_model.high_layer_norm.weight"] = torch.ones(64)
        tensors["vision_model.vision_tower_high.vision_tower.hd_alpha_downsamples"] = torch.tensor(0.5)  # 0-d
    else:
        tensors["vision_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, 32)
    save_file(tensors, str(orig_dir / "model.safetensors"))
    again, processor2 = vl.load(orig_dir)
    side = 160 if hybrid else 64
    assert processor2.image_processor.image_size == side and processor2.num_image_tokens == 16
    conv = [{"role": "user", "content": "<image_placeholder>Describe the image."}]
    batch = processor(conv, [vlh.noise_image(90, 120, seed=7)])
    with torch.no_grad():
        assert torch.equal(again(batch).logits, model(batch).logits)


def test_vl1_batched_and_chunked(vlh, tmp_path):
    _save(vlh, tmp_path, hybrid=True, tie=True)
    model, processor = vl.load(tmp_path)
    convs = [
        [{"role": "user", "content": "<image_placeholder>Describe the image."}],
        [{"role": "user", "content": "What colour is the car?"}],
        [{"role": "user", "content": "<image_placeholder> and <image_placeholder>: same?"}],
    ]
    images = [[vlh.noise_image(90, 120)], [], [vlh.noise_image(50, 50, 1), vlh.noise_image(70, 20, 2)]]
    batch = processor(convs, images)
    assert batch.images_emb_mask.shape == (3, 2, 16) and batch.images_emb_mask.sum() == 48
    with torch.no_grad():
        logits = model(batch).logits
        new = model.generate(batch, max_new_tokens=4)
        for i, (c, imgs) in enumerate(zip(convs, images)):
            single = processor(c, imgs)
            real = batch.attention_mask[i].bool()
            assert (logits[i, real] - model(single).logits[0]).abs().max() < 1e-4
            assert torch.equal(new[i], model.generate(single, max_new_tokens=4)[0])
            chunked = model.generate(single, max_new_tokens=4, prefill_chunk_size=5)
            assert torch.equal(chunked, model.generate(single, max_new_tokens=4))


def test_sharded_checkpoint_loads(vlh, tmp_path):
    (tmp_path / "single").mkdir()
    ref = _save(vlh, tmp_path / "single", hybrid=True, tie=True)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(str(sharded), max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (sharded / name).write_bytes((tmp_path / "single" / name).read_bytes())
    one, processor = vl.load(tmp_path / "single")
    many, _ = vl.load(sharded)
    batch = processor([{"role": "user", "content": "<image_placeholder>Hi"}], [vlh.noise_image(40, 40)])
    with torch.no_grad():
        assert torch.equal(one(batch).logits, many(batch).logits)


def test_vl1_chat_streams_the_greedy_reply(vlh, tmp_path):
    _save(vlh, tmp_path, hybrid=True, tie=True)
    model, processor = vl.load(tmp_path)
    conv = [{"role": "user", "content": "<image_placeholder>Describe the image."}]
    images = [vlh.noise_image(90, 120)]
    pieces = list(vl.chat(model, processor, conv, images, max_new_tokens=10))
    ids = model.generate(processor(conv, images), max_new_tokens=10, eos_token_id=processor.eos_id)[0].tolist()
    ids = ids[: ids.index(processor.eos_id)] if processor.eos_id in ids else ids
    assert "".join(pieces) == processor.tokenizer.decode(ids, skip_special_tokens=False)
    with pytest.raises(ValueError, match="one conversation"):
        next(vl.chat(model, processor, [conv, conv], [images, images]))


def test_hybrid_bf16_runs_on_cpu(vlh, tmp_path):
    """The hybrid's low-resolution resize has no bf16 CPU kernel; it must still run (in fp32) and stay close."""
    _save(vlh, tmp_path, hybrid=True, tie=True)
    fp32, processor = vl.load(tmp_path)
    bf16, _ = vl.load(tmp_path, dtype=torch.bfloat16)
    batch = processor([{"role": "user", "content": "<image_placeholder>Describe."}], [vlh.noise_image(90, 120)])
    with torch.no_grad():
        ref = fp32(batch).logits
        out = bf16(batch.to(dtype=torch.bfloat16)).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
