"""Decoding caches. MLA layers keep only the compressed latent and the shared rope key per token.

Buffers grow geometrically so appending one token per decode step is amortised O(1) copies;
`reserve` lets generation allocate the final length once. `nbytes` reports the bytes of the
tokens held (what the cache stores), `capacity_nbytes` the bytes allocated.
"""

from __future__ import annotations

import torch


class _GrowingBuffer:
    """A (B, T, ...) tensor along dim `time_dim` with spare capacity at the end."""

    def __init__(self, time_dim: int):
        self.time_dim = time_dim
        self.data: torch.Tensor | None = None
        self.length = 0
        self.capacity_hint = 0

    def append(self, new: torch.Tensor) -> torch.Tensor:
        end = self.length + new.shape[self.time_dim]
        if self.data is None or end > self.data.shape[self.time_dim]:
            self._grow(new, max(end, 2 * self.length, 16, self.capacity_hint))
        self.data.narrow(self.time_dim, self.length, new.shape[self.time_dim]).copy_(new)
        self.length = end
        return self.view()

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        shape = list(like.shape)
        shape[self.time_dim] = capacity
        grown = like.new_empty(shape)
        if self.data is not None and self.length:
            grown.narrow(self.time_dim, 0, self.length).copy_(self.view())
        self.data = grown

    def view(self) -> torch.Tensor:
        assert self.data is not None
        return self.data.narrow(self.time_dim, 0, self.length)

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        if self.data is None:
            return 0
        per_step = self.data.numel() // self.data.shape[self.time_dim] * self.data.element_size()
        return per_step * self.length

    def capacity_nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class LatentCache:
    """One MLA layer: rows of [kv_a_layernorm(c_kv) ; rope(k_pe)], shape (B, T, kv_lora_rank + qk_rope_head_dim)."""

    def __init__(self) -> None:
        self.latent = _GrowingBuffer(time_dim=1)

    def update(self, latent: torch.Tensor) -> torch.Tensor:
        return self.latent.append(latent)

    def buffers(self) -> list[_GrowingBuffer]:
        return [self.latent]


class KVCache:
    """One MHA layer: keys and values of shape (B, H_kv, T, head_dim)."""

    def __init__(self) -> None:
        self.keys = _GrowingBuffer(time_dim=2)
        self.values = _GrowingBuffer(time_dim=2)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.append(keys), self.values.append(values)

    def buffers(self) -> list[_GrowingBuffer]:
        return [self.keys, self.values]


class Cache:
    """Per-layer caches of one model (or of its MTP modules) for one batch."""

    def __init__(self, layers: list[LatentCache | KVCache]):
        self.layers = layers

    @property
    def seq_len(self) -> int:
        first = self.layers[0].buffers()[0]
        return first.length

    def reserve(self, total_tokens: int) -> None:
        """Make the next allocation hold `total_tokens`, so decoding up to that length never reallocates."""
        for layer in self.layers:
            for buffer in layer.buffers():
                buffer.capacity_hint = total_tokens

    def crop(self, length: int) -> None:
        """Drop every token after the first `length` (used to reject speculative tokens)."""
        for layer in self.layers:
            for buffer in layer.buffers():
                buffer.crop(length)

    def nbytes(self) -> int:
        return sum(b.nbytes() for layer in self.layers for b in layer.buffers())

    def capacity_nbytes(self) -> int:
        return sum(b.capacity_nbytes() for layer in self.layers for b in layer.buffers())
