"""Buffers that must stay fp32 when a model is cast to bf16/fp16 (router bias, RoPE frequencies, expert counts)."""

from __future__ import annotations

import torch
from torch import nn


class Fp32BuffersMixin(nn.Module):
    """`model.to(torch.bfloat16)` would round these; this keeps them fp32 while still moving devices."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        saved = {name: self._buffers[name] for name in self.fp32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in saved.items():
            after = self._buffers[name]
            if before.is_meta or after.is_meta or after.device != before.device:
                self._buffers[name] = after.to(torch.float32) if before.is_meta else before.to(after.device)
            else:
                self._buffers[name] = before
        return self
