"""Fine-tuning through the core: gradients reach every trainable tensor, loss falls, expert bias balances."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import shared_moe


def test_training_steps_reduce_loss_and_update_router_bias(tiny_checkpoint):
    _, folder = tiny_checkpoint("v3")
    model = shared_moe.from_pretrained(folder).train()
    data = torch.randint(2, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    bias_before = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    losses = []
    for step in range(8):
        logits = model(data[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        optimizer.step()
        model.update_expert_bias(1e-3)
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert not torch.equal(bias, bias_before) and bias.dtype == torch.float32
    assert "e_score_correction_bias" not in {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}


def test_documented_grouped_mm_switch_allows_a_double_backward(tiny_checkpoint):
    """README/gemm.py: the fused and oneDNN expert kernels are once-differentiable; the documented per-layer switch
    (an instance attribute, so setting it on the Experts class does nothing) lets a gradient penalty run."""
    _, folder = tiny_checkpoint("v3")
    model = shared_moe.from_pretrained(folder)
    for layer in model.moe_layers():
        layer.experts.gemm_backend = "grouped_mm"
    ids = torch.randint(2, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, use_cache=False).logits.logsumexp(-1).mean()
    (grad,) = torch.autograd.grad(loss, embeds, create_graph=True)
    grad.square().sum().backward()
    experts = model.moe_layers()[0].experts
    assert experts.gate_up_proj.grad.abs().sum() > 0 and experts.down_proj.grad.abs().sum() > 0


def test_expert_counts_take_only_real_tokens_and_skip_generation(tiny_checkpoint):
    """The model hands its attention mask to every MoE layer; generate() on a model left in train() counts nothing."""
    _, folder = tiny_checkpoint("v3")
    model = shared_moe.from_pretrained(folder).train()
    ids = torch.randint(2, 96, (3, 8), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0  # left padding
    attention_mask[1, 6:] = 0  # right padding
    model(ids, attention_mask=attention_mask, use_cache=False)
    top_k = model.config.num_experts_per_tok
    counted = [int(layer.tokens_per_expert.sum()) for layer in model.moe_layers()]
    assert counted == [int(attention_mask.sum()) * top_k] * 2
    for layer in model.moe_layers():
        layer.tokens_per_expert.zero_()
    model.generate(ids[2:], max_new_tokens=4)
    assert all(layer.tokens_per_expert.sum() == 0 for layer in model.moe_layers())
