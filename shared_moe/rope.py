"""Rotary position embeddings: default, linear, YaRN and Llama-3 frequency schedules.

Two rotation layouts exist in released checkpoints. DeepSeek V2/V3 MLA weights rotate interleaved
pairs (x[2i], x[2i+1]); Llama-shaped and MHA DeepSeek checkpoints rotate the two halves. The
interleaved rotation here returns the de-interleaved layout (rotated evens, then rotated odds):
queries and keys get the same permutation, so their dot products are unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .fp32_buffers import Fp32BuffersMixin


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) in fp32 and the amplitude applied to cos/sin."""
    base = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", "default")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(params["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, factor, params), 1.0
    return _yarn_frequencies(dim, base, factor, params)


def _yarn_frequencies(dim: int, base: float, factor: float, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: keep high-frequency dims, interpolate low-frequency dims by 1/factor, linear ramp between."""
    original = params["original_max_position_embeddings"]
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    positions = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation, interpolation = 1.0 / positions, 1.0 / (factor * positions)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep

    amplitude = params.get("attention_factor")
    if amplitude is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            amplitude = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            amplitude = _yarn_mscale(factor)
    return inv_freq, float(amplitude)


def _llama3_frequencies(inv_freq: torch.Tensor, factor: float, params: dict[str, Any]) -> torch.Tensor:
    low_factor, high_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low_factor, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high_factor) & (wavelen <= old_context / low_factor)
    return torch.where(medium, smoothed, scaled)


def softmax_scale(head_dim: int, params: dict[str, Any]) -> float:
    """MLA's 1/sqrt(d), times YaRN's attention temperature mscale(factor, mscale_all_dim)^2 when configured."""
    scale = head_dim**-0.5
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        m = _yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"]))
        scale *= m * m
    return scale


class RotaryEmbedding(Fp32BuffersMixin):
    """Produces fp32 (cos, sin) of shape (B, T, dim/2) for given positions."""

    fp32_buffers = ("inv_freq",)

    def __init__(self, dim: int, params: dict[str, Any]):
        super().__init__()
        inv_freq, self.amplitude = rope_frequencies(dim, params)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        return angles.cos() * self.amplitude, angles.sin() * self.amplitude


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) in fp32; output in de-interleaved layout. cos/sin broadcast to x[..., :d/2]."""
    x = x.float()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x[i], x[i + d/2]) pairs in fp32 (the Llama / GPT-NeoX layout)."""
    x = x.float()
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
