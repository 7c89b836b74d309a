"""SAM ViT-B image encoder with the DeepSeek-VL high-resolution additions ("sam_b_downsample").

The encoder is SAM's ViTDet: windowed attention with decomposed relative positions, global attention
in a few blocks, and a conv neck. DeepSeek resizes the neck map (64x64 -> 96x96) and runs two stride-2
convs to reach the SigLIP grid (24x24, 1024 channels). A second neck (`neck_hd`) reads the output of
the first global block, goes through the *same* `downsamples` and is added scaled by the learned scalar
`hd_alpha_downsamples`. Parameter names follow the DeepSeek checkpoint (`mlp.lin1`, `neck.0`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_BIAS_CHUNK_ELEMENTS = 1 << 24  # at most 64 MB of fp32 relative-position bias alive at once


@dataclass
class SAMConfig:
    image_size: int = 1024
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    neck_channels: int = 256
    downsample_channels: tuple[int, ...] = (512, 1024)
    neck_resize: int = 96
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def out_grid(self) -> int:
        return self.neck_resize // 2 ** len(self.downsample_channels)

    @property
    def out_channels(self) -> int:
        return self.downsample_channels[-1]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # NHWC


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(size, size, head_dim) embedding of the offset q - k, read from a (2*size - 1, head_dim) table."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table has {rel_pos.shape[0]} rows, expected {2 * size - 1}")
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


class Attention(nn.Module):
    """Multi-head attention over an (H, W) grid with decomposed relative position bias."""

    def __init__(self, cfg: SAMConfig, size: int):
        super().__init__()
        self.heads = cfg.heads
        head_dim = cfg.width // cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, HW, d)
        grid_q = q.reshape(B, self.heads, H, W, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_pos_table(H, self.rel_pos_h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_pos_table(W, self.rel_pos_w))
        # The full (HW x HW) bias of a global block at 1024 px is 4096^2 x heads floats (805 MB for SAM-B).
        # Query rows are independent, so the bias is built and used a band of grid rows at a time.
        rows = max(1, _BIAS_CHUNK_ELEMENTS // (B * self.heads * W * H * W))
        bands = []
        for top in range(0, H, rows):
            bias = rel_h[:, :, top : top + rows, :, :, None] + rel_w[:, :, top : top + rows, :, None, :]
            q_band = q[:, :, top * W : (top + rows) * W]
            bands.append(F.scaled_dot_product_attention(q_band, k, v, attn_mask=bias.flatten(2, 3).flatten(3)))
        out = bands[0] if len(bands) == 1 else torch.cat(bands, dim=2)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))


class Mlp(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.lin1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.act = nn.GELU()
        self.lin2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nwin, window, window, C), zero-padding H and W up to multiples of window."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % window, (-W) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]):
    Hp, Wp = padded
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.view(B, Hp // window, Wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, -1)[:, : size[0], : size[1]]


class Block(nn.Module):
    def __init__(self, cfg: SAMConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg, window_size if window_size else cfg.grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window_size:
            windows, padded = window_partition(h, self.window_size)
            h = window_unpartition(self.attn(windows), self.window_size, padded, x.shape[1:3])
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


def make_neck(cfg: SAMConfig) -> nn.Sequential:
    c = cfg.neck_channels
    return nn.Sequential(
        nn.Conv2d(cfg.width, c, 1, bias=False),
        LayerNorm2d(c, cfg.eps),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        LayerNorm2d(c, cfg.eps),
    )


def make_downsamples(cfg: SAMConfig) -> nn.Sequential:
    """Stride-2 3x3 convs with no activation or norm between them (as in the checkpoint)."""
    chans = (cfg.neck_channels, *cfg.downsample_channels)
    return nn.Sequential(*(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False) for a, b in zip(chans, chans[1:])))


class SAMEncoder(nn.Module):
    """(B, 3, S, S) CLIP-normalised pixels -> (B, out_channels, out_grid, out_grid)."""

    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.layers)
        )
        self.neck = make_neck(cfg)
        self.neck_hd = make_neck(cfg)
        self.downsamples = make_downsamples(cfg)
        self.hd_alpha_downsamples = nn.Parameter(torch.zeros(1))

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain SAM: (neck output NCHW, output of the first global block NHWC)."""
        size = self.cfg.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"SAM expects (B, 3, {size}, {size}) pixels, got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels) + self.pos_embed
        first_global = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.cfg.global_attn_indexes[0]:
                first_global = x
        return self.neck(x.permute(0, 3, 1, 2)), first_global

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.cfg.neck_resize, self.cfg.neck_resize)
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)
        return self.downsamples(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x, first_global = self.encode(pixels)
        hd = self.neck_hd(first_global.permute(0, 3, 1, 2))
        # The reference downsamples both maps and then blends them. Resize and convs are linear (no bias,
        # no activation), so blending first gives the same result with one pass instead of two.
        return self.downsample(x + hd * self.hd_alpha_downsamples)
