"""`vl.chat`: one conversation + images -> the assistant's reply, streamed as text pieces."""

from __future__ import annotations

from collections.abc import Iterator

from shared_moe.generation import stop_token_ids

from .batch import VisionLanguageModel
from .processing import VL2ChatProcessor, VLChatProcessor


def _pieces(model: VisionLanguageModel, processor, conversation: list, images, gen: dict) -> Iterator[str]:
    batch = processor(conversation, images)
    if len(batch) != 1:
        raise ValueError("chat takes one conversation; use model.generate(processor(...)) for batches")
    vision_dtype = next(model.parameters()).dtype
    batch = batch.to(model.lm.device, vision_dtype)
    gen.setdefault("eos_token_id", processor.eos_id)
    stops = set(stop_token_ids(gen["eos_token_id"]))  # read as shared_moe reads it
    ids: list[int] = []
    emitted = ""
    for token in model.stream(batch, **gen):
        token_id = int(token[0])
        if token_id in stops:
            break
        ids.append(token_id)
        # Decode the whole reply each step: a piece may complete a multi-byte character or merge.
        text = processor.tokenizer.decode(ids, skip_special_tokens=False)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            continue
        yield text[len(emitted) :]
        emitted = text
    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
    if text != emitted and text.startswith(emitted):
        yield text[len(emitted) :]


def chat(
    model: VisionLanguageModel,
    processor: VLChatProcessor | VL2ChatProcessor,
    conversation: list[dict],
    images: list | None = None,
    stream: bool = True,
    max_new_tokens: int = 512,
    **gen,
) -> Iterator[str] | str:
    """Text pieces of the reply as they are generated (`stream=True`) or the whole reply.

    `gen` are `shared_moe` generation arguments (do_sample, temperature, top_p, prefill_chunk_size,
    ...). Decoding stops at the tokenizer's EOS, or at any id of an `eos_token_id` list given in `gen`;
    the stop token is not part of the reply. Special tokens (grounding tags) stay in the text.
    """
    pieces = _pieces(model, processor, conversation, images, dict(gen, max_new_tokens=max_new_tokens))
    return pieces if stream else "".join(pieces)
