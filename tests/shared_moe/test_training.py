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
