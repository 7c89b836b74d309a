"""Generation: logit processors vs transformers, left-padded batches, chunked prefill, streaming, sampling."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import shared_moe
from shared_moe.generation import SamplingConfig, process_logits


def test_logit_processors_match_transformers():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen) * 3
    seen = torch.randint(0, 50, (3, 7), generator=gen)
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    expected = TemperatureLogitsWarper(0.7)(seen, expected)
    expected = TopKLogitsWarper(20)(seen, expected)
    expected = TopPLogitsWarper(0.8)(seen, expected)
    got = process_logits(logits.clone(), seen, cfg)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = ~torch.isinf(got)
    assert torch.allclose(got[finite], expected[finite], atol=1e-6)


@pytest.fixture(params=["v3", "llama"])
def model(request, tiny_checkpoint):
    _, folder = tiny_checkpoint(request.param)
    return shared_moe.from_pretrained(folder, dtype=torch.float32)


def left_pad(sequences: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


def test_left_padded_batch_equals_single_sequences(model):
    sequences = [[5, 9, 33, 41, 7, 8, 60], [12, 13, 14], [70, 71, 72, 73, 74]]
    ids, mask = left_pad(sequences)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        for row, seq in enumerate(sequences):
            single = model(torch.tensor([seq])).logits[0]
            real = batch_logits[row, -len(seq) :]
            assert (real - single).abs().max() < 1e-5
    batch_out = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    for row, seq in enumerate(sequences):
        single = model.generate(torch.tensor([seq]), max_new_tokens=10)
        assert batch_out[row, ids.shape[1] :].tolist() == single[0, len(seq) :].tolist()


def test_chunked_prefill_equals_one_shot(model):
    ids = torch.randint(2, 96, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = model.new_cache()
        for start in range(0, 23, 5):
            out = model(ids[:, start : start + 5], cache=cache)
    assert (out.logits[:, -1] - full).abs().max() < 1e-5
    assert model.generate(ids, 8, prefill_chunk_size=4).tolist() == model.generate(ids, 8).tolist()


def test_stream_yields_generate_tokens(model):
    ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    streamed = torch.stack(list(model.stream(ids, max_new_tokens=9)), dim=1)
    assert streamed.tolist() == model.generate(ids, max_new_tokens=9)[:, 6:].tolist()


def test_stop_tokens_end_each_sequence(model):
    ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    free = model.generate(ids, max_new_tokens=12)
    stop = int(free[0, 6 + 2])
    stopped = model.generate(ids, max_new_tokens=12, eos_token_id=[stop, 95], pad_token_id=0)
    row = stopped[0, 6:].tolist()
    assert row[:3] == free[0, 6:9].tolist() and all(t == 0 for t in row[3:])


def test_sampling_is_seeded_and_respects_top_k(model):
    ids = torch.randint(2, 96, (2, 5), generator=torch.Generator().manual_seed(6))

    def sample(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(ids, 15, do_sample=True, temperature=1.5, top_p=0.9, generator=gen)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    greedy_like = model.generate(ids, 10, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    assert greedy_like.tolist() == model.generate(ids, 10).tolist()


def test_inputs_embeds_generation_equals_ids(model):
    ids = torch.randint(2, 96, (1, 6), generator=torch.Generator().manual_seed(8))
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6)
    assert from_embeds.tolist() == model.generate(ids, 6)[:, 6:].tolist()


def test_bad_sampling_arguments_raise(model):
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.tensor([[3]]), 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.tensor([[3]]), 2, do_sample=True, top_p=1.5)


def test_attention_mask_is_inferred_from_pad_like_transformers(tiny_checkpoint):
    """No mask given: pad is masked only when it occurs and is not eos, for any batch size. A real eos inside a
    multi-turn prompt (pad == eos, as in DeepSeek tokenizers) stays visible; a left-padded single row is masked."""
    hf, folder = tiny_checkpoint("v3")
    model = shared_moe.from_pretrained(folder, dtype=torch.float32)
    eos, pad = 1, 2
    multi_turn, _ = left_pad([[5, 9, 33, 41, eos, 7, 8, 60], [12, 13, 14]], pad=eos)
    padded_row = torch.tensor([[pad, pad, pad, 12, 13, 14]])
    for ids, pad_token_id in [(multi_turn, eos), (padded_row, pad)]:
        expected = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=pad_token_id)
        assert model.generate(ids, 8, eos_token_id=eos, pad_token_id=pad_token_id).tolist() == expected.tolist()


def test_empty_prompt_and_bad_prefill_chunk_size_raise(model):
    with pytest.raises(ValueError, match="prompt has no tokens"):
        model.generate(torch.empty(1, 0, dtype=torch.long), 3)
    for chunk in (0, -1):
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            model.generate(torch.tensor([[3, 4]]), 3, prefill_chunk_size=chunk)


def test_empty_eos_list_means_no_stop_token(model):
    ids = torch.tensor([[5, 6, 7]])
    assert model.generate(ids, 4, eos_token_id=[]).tolist() == model.generate(ids, 4).tolist()
