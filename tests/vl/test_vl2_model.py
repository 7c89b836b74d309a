"""DeepSeek-VL2 on the shared core: loading, embedding layout, batching, chunked prefill, text path."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import vl
from vl.loading import add_pad_token
from vl.modeling_vl2 import tile_layout

USER_IMAGE = [{"role": "user", "content": "<image>\nDescribe the image."}]


@pytest.fixture(scope="module")
def loaded(vl2_checkpoint):
    return vl.load(vl2_checkpoint)


def test_original_layout_loads_every_tensor(vl2_checkpoint, loaded):
    model, processor = loaded
    stored = load_file(str(vl2_checkpoint / "model.safetensors"))
    state = model.state_dict()
    assert set(stored) == set(state)
    assert all(torch.equal(stored[k], state[k]) for k in stored)
    assert processor.image_processor.candidate_resolutions[3] == (112, 112)
    assert model.lm.config.use_mla is False and model.lm.config.n_routed_experts == 8


def test_random_weights_are_seeded_with_unit_norm_scales(vl2_checkpoint):
    first, _ = vl.load(vl2_checkpoint)
    second, _ = vl.load(vl2_checkpoint)
    a = first.init_random_weights_(std=0.05, seed=7).state_dict()
    b = second.init_random_weights_(std=0.05, seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    norms = [k for k in a if "norm" in k and k.endswith("weight")]
    assert norms and all(bool((a[k] == 1).all()) for k in norms)
    weight = a["language.model.layers.0.mlp.gate_proj.weight"]
    assert abs(float(weight.std()) - 0.05) < 0.01
    assert not torch.equal(
        weight,
        second.init_random_weights_(std=0.05, seed=8).state_dict()["language.model.layers.0.mlp.gate_proj.weight"],
    )


def test_mismatched_checkpoint_is_one_clear_error(vlh, tmp_path):
    path = vlh.write_vl2_checkpoint(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("image_newline")
    tensors["projector.layers.0.weight"] = tensors["projector.layers.0.weight"][:, :-1].contiguous()
    tensors["vision.extra"] = torch.zeros(1)
    from safetensors.torch import save_file

    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(vl.loading.CheckpointMismatchError) as err:
        vl.load(path)
    message = str(err.value)
    assert "1 missing:\n  image_newline" in message and "1 unexpected:\n  vision.extra" in message
    assert "1 mis-shaped:\n  projector.layers.0.weight" in message


def test_image_embeddings_land_in_layout_order(vlh, loaded):
    model, processor = loaded
    batch = processor(USER_IMAGE, [vlh.noise_image(100, 60)])
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(batch)
        views = model.encode_views(batch.pixel_values[0, :5])
        expected = tile_layout(views[0], views[1:5], (2, 2), model.image_newline, model.view_seperator)
    positions = batch.images_seq_mask[0].nonzero().squeeze(1)
    assert torch.equal(embeds[0, positions], expected)
    assert torch.equal(embeds[0, positions[2]], model.image_newline.detach())  # row of 2 tokens, then newline
    assert torch.equal(embeds[0, positions[6]], model.view_seperator.detach())  # after 2 x (2 + 1) global slots
    text = ~batch.images_seq_mask[0]
    assert torch.equal(embeds[0, text], model.lm.get_input_embeddings()(batch.input_ids[0, text]).detach())


def test_batched_left_padding_equals_per_sample(vlh, loaded):
    model, processor = loaded
    convs = [
        USER_IMAGE,
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "<image> vs <image>: which is brighter, and why?"}],
    ]
    images = [[vlh.noise_image(100, 60)], [], [vlh.noise_image(60, 100, 1), vlh.noise_image(56, 56, 2)]]
    batch = processor(convs, images)
    with torch.no_grad():
        logits = model(batch).logits
        for i, (c, imgs) in enumerate(zip(convs, images)):
            single = model(processor(c, imgs)).logits[0]
            real = batch.attention_mask[i].bool()
            assert (logits[i, real] - single).abs().max() < 1e-4, i
        new = model.generate(batch, max_new_tokens=4)
        for i, (c, imgs) in enumerate(zip(convs, images)):
            assert torch.equal(new[i], model.generate(processor(c, imgs), max_new_tokens=4)[0])


def test_chunked_prefill_gives_the_same_tokens(vlh, loaded):
    model, processor = loaded
    batch = processor(USER_IMAGE, [vlh.noise_image(100, 60)])
    assert batch.input_ids.shape[1] > 20
    with torch.no_grad():
        one_shot = model.generate(batch, max_new_tokens=5)
        for chunk in (4, 7, 16):
            assert torch.equal(model.generate(batch, max_new_tokens=5, prefill_chunk_size=chunk), one_shot)


def test_text_only_request_takes_the_pure_text_path(loaded):
    model, processor = loaded
    batch = processor([{"role": "user", "content": "Tell me a story."}])
    calls = []
    handle = model.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            logits = model(batch).logits
            text_logits = model.lm(input_ids=batch.input_ids).logits
    finally:
        handle.remove()
    assert calls == []
    assert torch.equal(logits, text_logits)


@pytest.mark.parametrize("as_list, stop_on_second", [(False, False), (True, False), (True, True)])
def test_chat_stops_at_any_id_of_an_eos_list(loaded, monkeypatch, as_list, stop_on_second):
    model, processor = loaded
    text_ids = processor.tokenizer.encode("A cat sits", add_special_tokens=False)
    second = processor.image_token_id
    stop = second if stop_on_second else processor.eos_id
    scripted = text_ids + [stop] + text_ids  # shared_moe streams the stop id itself
    monkeypatch.setattr(model, "stream", lambda batch, **gen: (torch.tensor([i]) for i in scripted))
    eos_token_id = [processor.eos_id, second] if as_list else processor.eos_id
    reply = vl.chat(model, processor, [{"role": "user", "content": "Hi"}], stream=False, eos_token_id=eos_token_id)
    assert reply == processor.tokenizer.decode(text_ids)


MLA = dict(use_mla=True, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
LM_VARIANTS = {
    "small": dict(MLA, topk_method="greedy", scoring_func="softmax"),
    "base": dict(MLA, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0),
}


@pytest.mark.parametrize("variant", sorted(LM_VARIANTS))
def test_small_and_base_language_models_load_and_run(vlh, tmp_path, variant):
    path = vlh.write_vl2_checkpoint(tmp_path, seed=5, language_overrides=LM_VARIANTS[variant])
    model, processor = vl.load(path)
    cfg = model.lm.config
    assert cfg.use_mla and cfg.scoring_func == LM_VARIANTS[variant]["scoring_func"]
    if variant == "base":
        assert cfg.topk_method == "noaux_tc" and cfg.routed_scaling_factor == 2.0 and cfg.norm_topk_prob
        stored = load_file(str(path / "model.safetensors"))
        key = "language.model.layers.1.mlp.gate.e_score_correction_bias"
        assert key in stored
    batch = processor(USER_IMAGE, [vlh.noise_image(100, 60)])
    with torch.no_grad():
        logits = model(batch).logits
        chunked = model.generate(batch, max_new_tokens=3, prefill_chunk_size=5)
        assert torch.equal(chunked, model.generate(batch, max_new_tokens=3))
    assert torch.isfinite(logits).all()


def test_tail_global_view(vlh, tmp_path):
    model, processor = vl.load(vlh.write_vl2_checkpoint(tmp_path, global_view_pos="tail"))
    batch = processor(USER_IMAGE, [vlh.noise_image(100, 60)])
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(batch)
    positions = batch.images_seq_mask[0].nonzero().squeeze(1)
    local_len = 4 * 5  # (2 * nh) rows of (2 * nw + 1)
    assert torch.equal(embeds[0, positions[local_len]], model.view_seperator.detach())


def test_bf16_runs(vlh, vl2_checkpoint):
    model, processor = vl.load(vl2_checkpoint, dtype=torch.bfloat16)
    batch = processor(USER_IMAGE, [vlh.noise_image(100, 60)]).to(dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(batch).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def _hf_reference(variant: str, vocab: int):
    """transformers' DeepseekV2 (small: softmax greedy) / DeepseekV3 (base: sigmoid noaux_tc) twin."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
    )
    if variant == "small":
        return DeepseekV2ForCausalLM(DeepseekV2Config(**common, topk_method="greedy", routed_scaling_factor=1.0))
    return DeepseekV3ForCausalLM(DeepseekV3Config(**common, routed_scaling_factor=2.0, norm_topk_prob=True))


def _swap_language(path, language: dict) -> None:
    """Replace the `language.*` tensors of a VL2 checkpoint folder, keeping the vision side."""
    from safetensors.torch import save_file

    tensors = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not k.startswith("language.")}
    tensors.update({"language." + k: v.contiguous() for k, v in language.items()})
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("variant", sorted(LM_VARIANTS))
def test_small_and_base_language_models_match_transformers(vlh, tmp_path, variant):
    """VL2 language_config -> shared core gives transformers' V2/V3 logits on the merged embeddings."""
    path = vlh.write_vl2_checkpoint(tmp_path / "vl2", seed=6, language_overrides=LM_VARIANTS[variant])
    vocab = vl.load(path)[0].lm.config.vocab_size
    torch.manual_seed(0)
    ref = _hf_reference(variant, vocab)
    vlh.randomize(ref, seed=7)
    with torch.no_grad():
        for name, buf in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(8)) * 0.3)
    ref.eval().save_pretrained(str(tmp_path / "hf"), save_original_format=True)
    _swap_language(path, load_file(str(tmp_path / "hf" / "model.safetensors")))

    model, processor = vl.load(path)
    batch = processor(USER_IMAGE, [vlh.noise_image(100, 60)])
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(batch)
        expected = ref(inputs_embeds=embeds).logits
        got = model(batch).logits
    assert (got - expected).abs().max() < 1e-4


def test_tiny_language_model_matches_transformers(vlh, tmp_path):
    """VL2-Tiny's LM (MHA + softmax greedy DeepSeekMoE, dense layer 0) against transformers'
    DeepSeek-OCR-2 text model, the same architecture, on the merged embeddings (final hidden states)."""
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextModel

    path = vlh.write_vl2_checkpoint(tmp_path / "vl2", seed=9)
    lm_cfg = vl.load(path)[0].lm.config
    torch.manual_seed(0)
    ref = DeepseekOcr2TextModel(
        DeepseekOcr2TextConfig(
            vocab_size=lm_cfg.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            mlp_layer_types=["dense", "sparse", "sparse"],
            n_group=1,
            topk_group=1,
            rms_norm_eps=1e-6,
        )
    )
    vlh.randomize(ref, seed=10, scale=0.15)
    head = load_file(str(path / "model.safetensors"))["language.lm_head.weight"]
    _swap_language(path, {**{"model." + k: v for k, v in ref.state_dict().items()}, "lm_head.weight": head})

    model, processor = vl.load(path)
    batch = processor(USER_IMAGE, [vlh.noise_image(100, 60)])
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(batch)
        expected = ref.eval()(inputs_embeds=embeds).last_hidden_state
        got = model.lm(inputs_embeds=embeds).last_hidden_state
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(vlh, vl2_checkpoint):
    cpu, processor = vl.load(vl2_checkpoint)
    gpu, _ = vl.load(vl2_checkpoint, device="cuda")
    batch = processor(USER_IMAGE, [vlh.noise_image(100, 60)])
    with torch.no_grad():
        expected = cpu(batch).logits
        got = gpu(batch.to("cuda")).logits.cpu()
        assert (got - expected).abs().max() < 1e-3
        bf16, _ = vl.load(vl2_checkpoint, dtype=torch.bfloat16, device="cuda")
        assert torch.isfinite(bf16(batch.to("cuda")).logits.float()).all()


def test_load_passes_input_limits_to_the_processor(vlh, vl2_checkpoint):
    _, processor = vl.load(vl2_checkpoint, max_pixels=50 * 50, tag_policy="fix")
    with pytest.raises(vl.ImageLoadError, match="max_pixels=2500"):
        processor(USER_IMAGE, [vlh.noise_image(60, 60)])
    fixed = processor([{"role": "user", "content": "Describe."}], [vlh.noise_image(50, 50)])
    assert int(fixed.images_seq_mask.sum()) == vl.VL2ImageProcessor(tile_size=56).token_count((1, 1))


def test_load_adds_the_pad_token_named_by_processor_config(vlh, tmp_path):
    path = vlh.write_vl2_checkpoint(tmp_path / "no_pad")  # processor_config.json names PAD as pad_token
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    pad_id = tokenizer.pad_token_id
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(path))
    _, processor = vl.load(path)
    assert processor.pad_id == pad_id != processor.eos_id  # not EOS, which the repetition penalty would see


def test_a_new_pad_token_is_added_only_inside_the_embedding_table(vlh, tmp_path):
    tokenizer = vlh.make_tokenizer(tmp_path, vlh.VL2_SPECIALS)
    tokenizer.pad_token = None
    add_pad_token(tokenizer, "<new_pad>", vocab_size=len(tokenizer))  # its id, len(tokenizer), has no row
    assert tokenizer.pad_token is None
    add_pad_token(tokenizer, "<new_pad>", vocab_size=len(tokenizer) + 1)
    assert tokenizer.pad_token == "<new_pad>" and tokenizer.pad_token_id == len(tokenizer) - 1
