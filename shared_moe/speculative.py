"""Greedy speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) module as the draft.

Each step the MTP module drafts token i+2 from the main model's hidden state at i and token i+1; the
main model then scores [token i+1, draft] in one forward. A draft that equals the main model's own
argmax is kept together with the free token after it; otherwise the main cache is cropped back.
Every emitted token is a main-model argmax, so the output equals plain greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpeculativeResult:
    tokens: torch.Tensor  # (1, T + new)
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _draft(model, next_ids: torch.Tensor, hidden: torch.Tensor, mtp_cache) -> torch.Tensor:
    """Run the MTP module over new positions; returns its argmax at the last one, shape (1,)."""
    mtp = model.mtp_layers[0]
    rope, mask = model.positions_and_mask(1, next_ids.shape[1], mtp_cache.seq_len, None, None, hidden.dtype)
    embeds = model.get_input_embeddings()(next_ids)
    logits, _ = mtp.predict(embeds, hidden, rope, mask, mtp_cache.layers[0])
    return logits[:, -1].argmax(dim=-1)


@torch.no_grad()
def mtp_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
) -> SpeculativeResult:
    """Greedy decoding of one sequence (batch 1, no padding) drafted by the first MTP module.

    Like `generate`, decoding ends after a stop token, so the result can be shorter than max_new_tokens.
    """
    if not len(model.mtp_layers):
        raise ValueError("this model has no MTP layers (its checkpoint has no model.layers.{num_hidden_layers}.*)")
    if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
        raise ValueError("MTP speculative decoding supports one unpadded sequence")
    if do_sample:
        raise ValueError("MTP speculative decoding is greedy only")
    from .generation import check_prompt_and_chunk, stop_token_ids  # generation imports this module

    check_prompt_and_chunk(input_ids.shape[1], None)
    stops = set(stop_token_ids(eos_token_id))
    input_ids = input_ids.to(model.device)
    if max_new_tokens <= 0:  # as plain generation: the prompt alone
        return SpeculativeResult(input_ids, drafted=0, accepted=0)
    cache, mtp_cache = model.new_cache(), model.new_mtp_cache()
    cache.reserve(input_ids.shape[1] + max_new_tokens + 1)

    out = model(input_ids=input_ids, cache=cache)
    token = out.logits[:, -1].argmax(dim=-1)
    generated = [int(token)]
    draft = _draft(model, torch.cat([input_ids[:, 1:], token[:, None]], dim=1), out.last_hidden_state, mtp_cache)
    drafted = accepted = 0
    while len(generated) < max_new_tokens and generated[-1] not in stops:
        past = cache.seq_len
        out = model(input_ids=torch.stack([token, draft], dim=1), cache=cache)
        verified = out.logits[0].argmax(dim=-1)
        drafted += 1
        if int(verified[0]) == int(draft):
            accepted += 1
            new_ids, hidden = verified[None], out.last_hidden_state
        else:
            cache.crop(past + 1)
            new_ids, hidden = verified[None, :1], out.last_hidden_state[:, :1]
        for value in new_ids[0].tolist():
            if len(generated) < max_new_tokens and generated[-1] not in stops:
                generated.append(value)
        token = new_ids[:, -1]
        draft = _draft(model, new_ids, hidden, mtp_cache)

    new = torch.tensor(generated, device=input_ids.device)[None]
    return SpeculativeResult(torch.cat([input_ids, new], dim=1), drafted, accepted)
