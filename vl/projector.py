"""Vision-to-language projectors ("aligners") of DeepSeek-VL and DeepSeek-VL2.

Layer indices in `layers` match the checkpoints: GELUs sit at the odd/even slots the reference
`nn.Sequential` gave them, so `layers.0`/`layers.2` (VL1 1.3B, VL2) and `layers.1` (VL1 7B) load as-is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gelu_mlp(in_dim: int, hidden: int, out_dim: int, depth: int) -> list[nn.Module]:
    """Linear(in, hidden) then (GELU, Linear) pairs, the last one projecting to out_dim."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden if depth > 1 else out_dim)]
    for i in range(1, depth):
        layers += [nn.GELU(), nn.Linear(hidden, out_dim if i == depth - 1 else hidden)]
    return layers


class MlpProjector(nn.Module):
    """DeepSeek-VL `mlp_gelu`: one feature stream -> language width."""

    def __init__(self, input_dim: int, n_embed: int, depth: int = 2):
        super().__init__()
        self.layers = nn.Sequential(*gelu_mlp(input_dim, n_embed, n_embed, depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class HybridSplitMlpProjector(nn.Module):
    """DeepSeek-VL `low_high_hybrid_split_mlp_gelu`: half the width from SAM, half from SigLIP."""

    def __init__(self, high_dim: int, low_dim: int, n_embed: int, depth: int = 2):
        super().__init__()
        self.high_up_proj = nn.Linear(high_dim, n_embed // 2)
        self.low_up_proj = nn.Linear(low_dim, n_embed // 2)
        self.layers = nn.Sequential(*gelu_mlp(n_embed, n_embed, n_embed, depth)[1:])

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        high, low = features
        return self.layers(torch.cat([self.high_up_proj(high), self.low_up_proj(low)], dim=-1))


class DownsampleMlpProjector(nn.Module):
    """DeepSeek-VL2 `downsample_mlp_gelu`: 2x2 neighbourhoods of the patch grid -> one token.

    The 27x27 SigLIP grid is zero-padded to 28x28 in feature space; each output token concatenates
    its 2x2 block channel-major (index = c * 4 + dy * 2 + dx), as `F.unfold` lays it out.
    """

    def __init__(self, input_dim: int, n_embed: int, depth: int = 2, mlp_ratio: int = 1, downsample_ratio: int = 2):
        super().__init__()
        self.ratio = downsample_ratio
        in_dim = input_dim * downsample_ratio**2
        self.layers = nn.Sequential(*gelu_mlp(in_dim, n_embed * mlp_ratio, n_embed, depth))

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, side*side, C) -> (N, ceil(side / r)^2, C * r * r)."""
        n, tokens, c = x.shape
        side = int(tokens**0.5)
        if side * side != tokens:
            raise ValueError(f"projector input must be a square grid of tokens, got {tokens}")
        x = x.reshape(n, side, side, c).permute(0, 3, 1, 2)
        pad = (-side) % self.ratio
        x = F.pad(x, (0, pad, 0, pad))
        return F.unfold(x, kernel_size=self.ratio, stride=self.ratio).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.unfold(x))
