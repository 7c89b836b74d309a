"""MTP: the module trains through `mtp_logits`, and greedy speculation with it equals plain greedy decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shared_moe
from shared_moe.speculative import mtp_generate


def fit_mtp_to_own_continuations(model, prompts: torch.Tensor, new_tokens: int, steps: int) -> float:
    """Teach the MTP head the main model's greedy continuations of `prompts` so drafts get accepted."""
    data = model.generate(prompts, max_new_tokens=new_tokens)
    with torch.no_grad():
        hidden = model(data, use_cache=False).last_hidden_state
    optimizer = torch.optim.Adam(model.mtp_layers.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model.mtp_logits(data, hidden)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 2:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def test_speculative_decoding_is_exactly_greedy(tiny_checkpoint, add_mtp_layer):
    _, folder = tiny_checkpoint("v3", num_nextn_predict_layers=1)
    add_mtp_layer(folder)
    model = shared_moe.from_pretrained(folder)
    prompts = torch.randint(2, 96, (6, 4), generator=torch.Generator().manual_seed(0))
    untrained = [mtp_generate(model, p[None], 16) for p in prompts[:2]]
    loss = fit_mtp_to_own_continuations(model, prompts, new_tokens=16, steps=60)
    assert loss < 1.0

    drafted = accepted = 0
    for prompt in prompts:
        expected = model.generate(prompt[None], max_new_tokens=20)
        result = mtp_generate(model, prompt[None], 20)
        assert result.tokens.tolist() == expected.tolist()
        assert model.generate(prompt[None], max_new_tokens=20, use_mtp=True).tolist() == expected.tolist()
        drafted, accepted = drafted + result.drafted, accepted + result.accepted
    # Both branches ran: drafts accepted (two tokens per step) and rejected (cache cropped).
    assert 0 < accepted < drafted
    assert result.acceptance_rate > max(r.acceptance_rate for r in untrained)


def test_speculation_stops_at_eos_like_greedy(tiny_checkpoint, add_mtp_layer):
    _, folder = tiny_checkpoint("v3", num_nextn_predict_layers=1)
    add_mtp_layer(folder, seed=1)
    model = shared_moe.from_pretrained(folder)
    prompt = torch.randint(2, 96, (1, 5), generator=torch.Generator().manual_seed(7))
    greedy = model.generate(prompt, max_new_tokens=12)
    stop = int(greedy[0, 5 + 4])  # the 5th generated token becomes the stop token
    expected = model.generate(prompt, max_new_tokens=12, eos_token_id=stop)
    assert mtp_generate(model, prompt, 12, eos_token_id=stop).tokens.tolist() == expected.tolist()


def test_speculation_needs_an_mtp_checkpoint(tiny_checkpoint):
    _, folder = tiny_checkpoint("v3")
    model = shared_moe.from_pretrained(folder)
    try:
        mtp_generate(model, torch.tensor([[3, 4]]), 4)
    except ValueError as error:
        assert "no MTP layers" in str(error)
    else:
        raise AssertionError("expected a clear error")


def test_use_mtp_equals_greedy_for_any_length_and_takes_generate_arguments(tiny_checkpoint, add_mtp_layer):
    _, folder = tiny_checkpoint("v3", num_nextn_predict_layers=1)
    add_mtp_layer(folder)
    model = shared_moe.from_pretrained(folder)
    prompt = torch.tensor([[5, 6, 7]])
    for new_tokens in (0, 1, 3):
        assert model.generate(prompt, new_tokens, use_mtp=True).tolist() == model.generate(prompt, new_tokens).tolist()
    special = dict(eos_token_id=1, pad_token_id=0, attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert model.generate(prompt, 3, use_mtp=True, **special).tolist() == model.generate(prompt, 3, **special).tolist()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 3, use_mtp=True, temperature=0.7)
    with pytest.raises(ValueError, match="unpadded"):  # the mask inferred from pad_token_id, as plain generate does
        model.generate(torch.tensor([[0, 6, 7]]), 3, use_mtp=True, pad_token_id=0)
    with pytest.raises(ValueError, match="prompt has no tokens"):
        model.generate(torch.empty(1, 0, dtype=torch.long), 3, use_mtp=True)


def test_mtp_logits_of_left_padded_rows_equal_unpadded(tiny_checkpoint, add_mtp_layer):
    """With the forward's attention mask the MTP block neither attends to padding nor shifts its RoPE positions."""
    _, folder = tiny_checkpoint("v3", num_nextn_predict_layers=1)
    add_mtp_layer(folder)
    model = shared_moe.from_pretrained(folder)
    ids = torch.randint(2, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    attention_mask = (torch.arange(14) >= 4).long()[None]
    with torch.no_grad():
        hidden = model(ids, use_cache=False).last_hidden_state
        padded_hidden = model(padded, attention_mask=attention_mask, use_cache=False).last_hidden_state
        expected = model.mtp_logits(ids, hidden)
        got = model.mtp_logits(padded, padded_hidden, attention_mask=attention_mask)
    assert got.shape == (1, 13, 96)
    assert (got[:, 4:] - expected).abs().max() < 1e-4
