"""Parity with transformers on tiny random checkpoints saved by its own save_pretrained (fp32)."""

from __future__ import annotations

import pytest
import torch

import shared_moe
from shared_moe import gemm

TOL = 1e-5

CASES = {
    # name: (kind, save_original_format, config overrides)
    "v3-groups-norm": ("v3", True, {}),
    "v3-fused-no-norm": ("v3", False, {"norm_topk_prob": False}),
    "v3-qlora-yarn": ("v3", True, {"q_lora_rank": 24, "yarn": True}),
    "v3-one-group": ("v3", False, {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.0}),
    "v3-rotate-half-rope": ("v3", True, {"rope_interleave": False}),
    "v2-greedy": ("v2", True, {}),
    "v2-group-limited-yarn": ("v2", False, {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                            "routed_scaling_factor": 16.0, "yarn": True, "q_lora_rank": None}),
    "llama-gqa": ("llama", True, {}),
}


@pytest.fixture(params=["default-kernels", "onednn-for-every-linear"])
def kernels(request, monkeypatch):
    """Tiny models sit under Linear's oneDNN size threshold; the second run sends every projection through oneDNN."""
    if request.param == "onednn-for-every-linear":
        monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 0)
    return request.param


@pytest.fixture(params=sorted(CASES))
def pair(request, tiny_checkpoint, kernels):
    kind, original, overrides = CASES[request.param]
    hf, folder = tiny_checkpoint(kind, original_format=original, **overrides)
    return hf, shared_moe.from_pretrained(folder, dtype=torch.float32)


def test_full_sequence_logits(pair):
    hf, ours = pair
    ids = torch.randint(2, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert (got - expected).abs().max().item() < TOL


def test_prefill_then_decode_equals_full_forward(pair):
    hf, ours = pair
    ids = torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
        out = ours(ids[:, :8])
        pieces = [out.logits]
        for t in range(8, 12):
            out = ours(ids[:, t : t + 1], cache=out.cache)
            pieces.append(out.logits)
    assert (torch.cat(pieces, dim=1) - expected).abs().max().item() < TOL


def test_greedy_generate_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(2, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    expected = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=20)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_yarn_positions_beyond_original_context(tiny_checkpoint, kind):
    hf, folder = tiny_checkpoint(kind, yarn=True, seed=5)
    ours = shared_moe.from_pretrained(folder)
    ids = torch.randint(2, 96, (1, 16), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(4000, 4016)[None]  # original context is 64 tokens
    with torch.no_grad():
        expected = hf(ids, position_ids=positions).logits
        got = ours(ids, position_ids=positions).logits
    assert (got - expected).abs().max().item() < TOL


def test_router_bias_has_negative_values_and_stays_fp32(tiny_checkpoint):
    _, folder = tiny_checkpoint("v3")
    model = shared_moe.from_pretrained(folder, dtype=torch.bfloat16)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and (bias < 0).any() and (bias > 0).any()
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.bfloat16
    assert model.rotary.inv_freq.dtype == torch.float32


def test_mla_cache_holds_only_latent_and_rope_key(tiny_checkpoint):
    hf, folder = tiny_checkpoint("v3")
    cfg = hf.config
    for dtype in (torch.float32, torch.bfloat16):
        model = shared_moe.from_pretrained(folder, dtype=dtype)
        ids = torch.randint(2, 96, (2, 10))
        out = model(ids)
        out = model(ids[:, :3], cache=out.cache)
        tokens = 13
        per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        element = torch.finfo(dtype).bits // 8
        assert out.cache.nbytes() == 2 * cfg.num_hidden_layers * tokens * per_token * element
        assert out.cache.capacity_nbytes() >= out.cache.nbytes()  # growth is amortised: capacity may run ahead


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_decode_attends_in_latent_space_without_reprojecting_the_cache(tiny_checkpoint, kind):
    """Single-token decode must use the absorbed form: kv_b_proj never runs over cached latents."""
    hf, folder = tiny_checkpoint(kind)
    model = shared_moe.from_pretrained(folder)
    projected_rows = []
    for layer in model.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda m, inp, out: projected_rows.append(inp[0].shape[1]))
    ids = torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(ids[:, :8])
        assert projected_rows == [8] * hf.config.num_hidden_layers  # prefill expands once, as transformers does
        projected_rows.clear()
        for t in range(8, 12):
            out = model(ids[:, t : t + 1], cache=out.cache)
    assert projected_rows == []


def test_llama_yarn_with_mscale_all_dim_keeps_plain_softmax_scale(tiny_checkpoint):
    """Llama attention applies YaRN's cos/sin amplitude but not MLA's mscale_all_dim softmax temperature."""
    hf, folder = tiny_checkpoint("llama", yarn=True, seed=7)
    ours = shared_moe.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(2, 96, (2, 16), generator=torch.Generator().manual_seed(7))
    positions = torch.arange(3000, 3016)[None].expand(2, 16)
    with torch.no_grad():
        expected = hf(ids, position_ids=positions).logits
        got = ours(ids, position_ids=positions).logits
    assert (got - expected).abs().max().item() < TOL


def test_deepseek_v2_rotates_interleaved_pairs_whatever_rope_interleave_says(tiny_checkpoint):
    """transformers' DeepseekV2 has no rope_interleave switch: a stray `rope_interleave: false` must not apply."""
    hf, folder = tiny_checkpoint("v2", seed=8, rope_interleave=False)
    ours = shared_moe.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(2, 96, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert (got - expected).abs().max().item() < TOL
