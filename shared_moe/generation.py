"""Autoregressive decoding on the latent/KV cache: greedy, sampling, streaming, MTP speculation.

Logit processing follows the Hugging Face semantics users know: repetition penalty divides
positive and multiplies negative logits of seen tokens, temperature divides, top-k keeps the k
largest, top-p keeps the smallest set whose probability reaches p. Batches are left-padded: the
attention mask marks real tokens and positions count real tokens only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .cache import Cache
from .speculative import mtp_generate


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    """(B, V) fp32 logits -> processed logits (masked entries are -inf)."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        previous = logits.gather(1, seen)
        penalised = torch.where(previous < 0, previous * cfg.repetition_penalty, previous / cfg.repetition_penalty)
        logits = logits.scatter(1, seen, penalised)
    if not cfg.do_sample:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - cfg.top_p
        drop_sorted[:, -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor, seen: torch.Tensor | None, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    logits = process_logits(logits.float(), seen, cfg)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def stop_token_ids(eos_token_id: int | list[int] | None) -> list[int]:
    """The stop ids as a list; None and [] both mean no stop token, as in transformers."""
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _stop_ids(eos_token_id: int | list[int] | None, device: torch.device) -> torch.Tensor | None:
    ids = stop_token_ids(eos_token_id)
    return torch.tensor(ids, device=device) if ids else None


def infer_attention_mask(
    input_ids: torch.Tensor, pad_token_id: int | None, eos_token_id: int | list[int] | None
) -> torch.Tensor | None:
    """The mask transformers' generate infers when none is given (None: every token is real).

    Padding is read off `input_ids` only when pad_token_id occurs there and is not a stop token: DeepSeek
    tokenizers often pad with eos, and a multi-turn prompt holds real eos tokens that must stay visible.
    """
    if pad_token_id is None or pad_token_id in stop_token_ids(eos_token_id):
        return None
    mask = (input_ids != pad_token_id).long()
    return None if bool(mask.all()) else mask


def check_prompt_and_chunk(prompt_len: int, prefill_chunk_size: int | None) -> None:
    """Fail early with the cause: an empty prompt leaves no logits to pick the first token from."""
    if prompt_len == 0:
        raise ValueError("the prompt has no tokens; generation needs at least one (e.g. the BOS token)")
    if prefill_chunk_size is not None and prefill_chunk_size <= 0:
        raise ValueError(f"prefill_chunk_size must be a positive number of tokens or None, got {prefill_chunk_size}")


def _prefill(model, input_ids, inputs_embeds, attention_mask, cache: Cache, chunk: int | None):
    """Run the prompt through the model, optionally in chunks of `chunk` tokens; returns the last output."""
    source = inputs_embeds if inputs_embeds is not None else input_ids
    length = source.shape[1]
    step = chunk or length
    output = None
    for start in range(0, length, step):
        piece = source[:, start : start + step]
        kwargs = {"inputs_embeds": piece} if inputs_embeds is not None else {"input_ids": piece}
        mask = attention_mask[:, : start + piece.shape[1]] if attention_mask is not None else None
        output = model(attention_mask=mask, cache=cache, logits_to_keep=1, **kwargs)
    return output


@torch.no_grad()
def stream(
    model,
    input_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    prefill_chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,), once per step.

    Sequences that emitted a stop token keep yielding `pad_token_id` (default: the first stop id)
    until all have stopped or `max_new_tokens` is reached. With `inputs_embeds` (e.g. images already
    merged in), `input_ids` is optional and only feeds the repetition penalty. Without `attention_mask`,
    padding is inferred from `pad_token_id` as transformers does (see `infer_attention_mask`).
    """
    cfg = SamplingConfig(do_sample, temperature, top_p, top_k, repetition_penalty)
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids or inputs_embeds")
    reference = inputs_embeds if inputs_embeds is not None else input_ids
    batch, prompt_len = reference.shape[:2]
    check_prompt_and_chunk(prompt_len, prefill_chunk_size)
    device = model.device
    stop_ids = _stop_ids(eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else (int(stop_ids[0]) if stop_ids is not None else 0)
    if attention_mask is None and input_ids is not None:
        attention_mask = infer_attention_mask(input_ids, pad_token_id, eos_token_id)
    seen = input_ids.to(device) if input_ids is not None else None
    cache = model.new_cache()
    cache.reserve(prompt_len + max_new_tokens)

    output = _prefill(model, input_ids, inputs_embeds, attention_mask, cache, prefill_chunk_size)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = next_tokens(output.logits[:, -1], seen, cfg, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        if stop_ids is not None:
            finished |= torch.isin(token, stop_ids)
        yield token
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        seen = token[:, None] if seen is None else torch.cat([seen, token[:, None]], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        output = model(input_ids=token[:, None], attention_mask=attention_mask, cache=cache, logits_to_keep=1)


_MTP_ARGUMENTS = ("eos_token_id", "pad_token_id", "attention_mask", "do_sample")


def _generate_mtp(model, input_ids: torch.Tensor | None, max_new_tokens: int, kwargs: dict) -> torch.Tensor:
    """`generate(use_mtp=True)`: greedy MTP decoding takes the arguments that keep it equal to plain greedy."""
    unsupported = sorted(set(kwargs) - set(_MTP_ARGUMENTS))
    if unsupported:
        raise ValueError(
            f"generate(use_mtp=True) does not support {unsupported}: MTP speculative decoding is greedy, over one "
            f"unpadded sequence of input_ids, and takes only {list(_MTP_ARGUMENTS)}"
        )
    if input_ids is None:
        raise ValueError("generate(use_mtp=True) needs input_ids")
    pad_token_id = kwargs.pop("pad_token_id", None)
    if kwargs.get("attention_mask") is None:
        kwargs["attention_mask"] = infer_attention_mask(input_ids, pad_token_id, kwargs.get("eos_token_id"))
    return mtp_generate(model, input_ids, max_new_tokens, **kwargs).tokens


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
    """(B, T + new) tokens: the prompt followed by the generated tokens (padded after a stop token).

    `use_mtp=True` decodes greedily with the model's multi-token-prediction module as a draft; the
    tokens are exactly those of plain greedy decoding. It decodes one unpadded sequence and takes only
    eos_token_id, pad_token_id, attention_mask and do_sample=False besides max_new_tokens.
    """
    if kwargs.pop("use_mtp", False):
        return _generate_mtp(model, input_ids, max_new_tokens, kwargs)
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    if input_ids is None:
        batch = kwargs["inputs_embeds"].shape[0]
        input_ids = torch.empty(batch, 0, dtype=torch.long, device=model.device)
    if not new:
        return input_ids
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)
