"""Routers and grouped experts against direct per-expert reference computations."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from shared_moe import MoEConfig
from shared_moe.attention import MultiHeadLatentAttention
from shared_moe.moe import Experts, MoE, TopkRouter


def moe_config(**overrides) -> MoEConfig:
    values = dict(
        model_type="deepseek_v3", hidden_size=32, n_routed_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=16, n_shared_experts=1, n_group=4, topk_group=2, topk_method="noaux_tc",
        scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    values.update(overrides)
    return MoEConfig(**values)


def reference_experts(experts: Experts, x, indices, weights):
    """The obvious per-token, per-slot loop."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += weights[t, k] * (experts.down_proj[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("backend", [
    "auto",
    pytest.param("onednn", marks=pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                                    reason="the oneDNN grouped GEMM op needs a C++ compiler")),
    "grouped_mm",
    "padded_bmm",
])
@pytest.mark.parametrize("hidden,inter", [(32, 16), (30, 14)])  # (30, 14) breaks grouped_mm's 16-byte rule
def test_experts_match_per_token_loop_and_gradients(hidden, inter, backend):
    if backend == "grouped_mm" and hidden == 30:
        pytest.skip("torch._grouped_mm needs 16-byte aligned strides")
    gen = torch.Generator().manual_seed(0)
    experts = Experts(8, hidden, inter, gemm_backend=backend)
    with torch.no_grad():
        experts.gate_up_proj.copy_(0.2 * torch.randn(experts.gate_up_proj.shape, generator=gen))
        experts.down_proj.copy_(0.2 * torch.randn(experts.down_proj.shape, generator=gen))
    x = torch.randn(20, hidden, generator=gen, requires_grad=True)
    indices = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(20)])
    indices[:, 0] = 2  # one expert gets every token, some get none
    weights = torch.rand(20, 3, generator=gen)
    got = experts(x, indices, weights)
    expected = reference_experts(experts, x, indices, weights)
    assert (got - expected).abs().max() < 1e-5
    upstream = torch.randn(got.shape, generator=gen)
    grads = torch.autograd.grad((got * upstream).sum(), [x, experts.gate_up_proj, experts.down_proj])
    ref_grads = torch.autograd.grad((expected * upstream).sum(), [x, experts.gate_up_proj, experts.down_proj])
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() < 1e-4


def router_reference(router: TopkRouter, x: torch.Tensor):
    """Straightforward re-statement of the routing rules, expert by expert."""
    scores = (x.double() @ router.weight.double().T)
    scores = scores.softmax(-1) if router.scoring == "softmax" else scores.sigmoid()
    choice = scores + (router.e_score_correction_bias.double() if router.method == "noaux_tc" else 0)
    per_group = router.num_experts // router.n_group
    chosen = []
    for row in choice:
        groups = row.view(router.n_group, per_group)
        if router.method == "noaux_tc":
            group_score = groups.topk(2).values.sum(-1)
        else:
            group_score = groups.max(-1).values
        if router.method == "greedy":
            group_score = torch.ones(router.n_group, dtype=torch.float64)
        kept_groups = router.topk_group if router.method != "greedy" else router.n_group
        keep = set(group_score.topk(kept_groups).indices.tolist())
        allowed = [e for e in range(router.num_experts) if e // per_group in keep]
        chosen.append(sorted(allowed, key=lambda e: -row[e])[: router.top_k])
    return scores, chosen


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_topk_prob": False},
        {"topk_method": "group_limited_greedy", "scoring_func": "softmax", "routed_scaling_factor": 16.0,
         "norm_topk_prob": False},
        {"topk_method": "greedy", "scoring_func": "softmax", "n_group": 1, "topk_group": 1},
    ],
)
def test_router_choices_and_weights(overrides):
    config = moe_config(**overrides)
    router = TopkRouter(config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        if config.topk_method == "noaux_tc":
            router.e_score_correction_bias.copy_(torch.randn(8, generator=gen) - 0.5)
    x = torch.randn(64, 32, generator=gen)
    _, weights, indices = router(x)
    scores, chosen = router_reference(router, x)
    for t in range(64):
        assert sorted(indices[t].tolist()) == sorted(chosen[t])
        raw = scores[t, indices[t]]
        if config.norm_topk_prob:
            raw = raw / raw.sum()
        assert torch.allclose(weights[t].double(), raw * config.routed_scaling_factor, atol=1e-6)


def test_excluded_groups_masked_with_minus_inf_even_with_negative_bias():
    """With a 0.0 fill a group whose biased scores are all negative would still win; -inf must not."""
    config = moe_config(n_group=2, topk_group=1, num_experts_per_tok=4)
    router = TopkRouter(config)
    with torch.no_grad():
        router.weight.zero_()  # every sigmoid score is 0.5
        router.e_score_correction_bias.copy_(torch.tensor([-1.0, -1.1, -1.2, -1.3, -2.0, -2.1, -2.2, -2.3]))
    _, _, indices = router(torch.randn(5, 32))
    assert bool((indices < 4).all())  # only group 0 (the less negative one) competes


def test_expert_bias_update_moves_towards_balance():
    moe = MoE(moe_config()).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
        moe.gate.e_score_correction_bias.zero_()
    moe(torch.randn(4, 16, 32))
    counts = moe.tokens_per_expert.clone()
    assert counts.sum() == 4 * 16 * 3
    moe.update_expert_bias(rate=1e-3)
    bias = moe.gate.e_score_correction_bias
    busiest, idlest = counts.argmax(), counts.argmin()
    assert bias[busiest] < bias[idlest]
    assert abs(float(bias.sum())) < 1e-6  # re-centred
    assert moe.tokens_per_expert.sum() == 0
    moe.eval()
    moe(torch.randn(2, 3, 32))
    assert moe.tokens_per_expert.sum() == 0  # counted only while training


def random_moe(**overrides) -> MoE:
    moe = MoE(moe_config(**overrides))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return moe


def test_expert_counts_skip_padding_and_no_grad_forwards():
    """Padding would inflate the load of whatever experts pad tokens route to; generate() runs under no_grad."""
    moe = random_moe().train()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(5))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    moe(x, attention_mask)
    _, _, indices = moe.gate(x.reshape(-1, 32))
    expected = torch.bincount(indices[attention_mask.reshape(-1) == 1].reshape(-1), minlength=8)
    assert torch.equal(moe.tokens_per_expert, expected.float())
    with torch.no_grad():
        moe(x, attention_mask)
    assert torch.equal(moe.tokens_per_expert, expected.float())


def test_torch_func_grad_works_in_train_mode_and_does_not_count():
    """torch.func forbids the in-place count update of a captured buffer, so transformed forwards do not count."""
    moe = random_moe().train()
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(6))
    params = dict(moe.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(moe, p, (x,)).square().sum())(params)
    assert moe.tokens_per_expert.sum() == 0
    expected = torch.autograd.grad(moe(x).square().sum(), list(params.values()))
    for (name, got), want in zip(grads.items(), expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), name


def test_absorbed_and_expanded_mla_agree():
    config = moe_config(hidden_size=48, num_attention_heads=3, kv_lora_rank=24, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=12, q_lora_rank=16)
    gen = torch.Generator().manual_seed(3)
    absorbed, expanded = MultiHeadLatentAttention(config, "always"), MultiHeadLatentAttention(config, "never")
    with torch.no_grad():
        for p in absorbed.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    expanded.load_state_dict(absorbed.state_dict())
    x = torch.randn(2, 7, 48, generator=gen)
    angles = torch.arange(7.0)[None, :, None] * torch.tensor([1.0, 0.1])
    rope = (angles.cos().expand(2, 7, 2), angles.sin().expand(2, 7, 2))
    assert (absorbed(x, rope, None, None) - expanded(x, rope, None, None)).abs().max() < 1e-5
