"""Pixel preparation for DeepSeek-VL (resize + pad to a square) and DeepSeek-VL2 (dynamic tiling).

VL1 keeps pixels in [0, 1]: each vision tower normalises with its own mean/std. VL2 normalises the
tiles here with 0.5/0.5, as its single SigLIP tower expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (width, height), in the order of the released VL2 configs; the order decides ties.
CANDIDATE_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (384, 384),
    (384, 768),
    (768, 384),
    (384, 1152),
    (1152, 384),
    (384, 1536),
    (1536, 384),
    (768, 768),
    (384, 1920),
    (1920, 384),
    (384, 2304),
    (2304, 384),
    (768, 1152),
    (1152, 768),
    (384, 2688),
    (2688, 384),
    (384, 3072),
    (3072, 384),
    (768, 1536),
    (1536, 768),
    (384, 3456),
    (3456, 384),
    (1152, 1152),
)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float in [0, 1] (same arithmetic as torchvision's `to_tensor`)."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return arr.permute(2, 0, 1).float().div(255)


def background_color(mean: tuple[float, ...]) -> tuple[int, int, int]:
    """The pad colour the reference derives from the normalisation mean (`int(m * 255)`)."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# DeepSeek-VL: longest side to `image_size` (floor), min side 14, bicubic, centred on a square.
# ---------------------------------------------------------------------------------------------
@dataclass
class VLImageProcessor:
    image_size: int = 1024
    min_size: int = 14
    background: tuple[int, int, int] = (122, 116, 104)

    def resize_and_pad(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        longest = max(width, height)
        new_w = max(int(width / longest * self.image_size), self.min_size)
        new_h = max(int(height / longest * self.image_size), self.min_size)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        side = max(new_w, new_h)
        canvas = Image.new("RGB", (side, side), self.background)
        canvas.paste(img, ((side - new_w) // 2, (side - new_h) // 2))
        return canvas

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, 3, S, S) pixels in [0, 1]."""
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack([to_tensor(self.resize_and_pad(img)) for img in images])


# ---------------------------------------------------------------------------------------------
# DeepSeek-VL2: anyres tiling.
# ---------------------------------------------------------------------------------------------
def select_best_resolution(
    image_size: tuple[int, int], candidates: tuple[tuple[int, int], ...] | list = CANDIDATE_RESOLUTIONS
) -> tuple[int, int]:
    """The candidate (w, h) keeping the most original pixels, then wasting the fewest; first wins ties."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    best, best_effective, best_waste = None, 0, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(cand_w), int(cand_h)), effective, waste
    if best is None:
        raise ValueError("no candidate resolutions given")
    return best


def _contained_size(image_size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The size `ImageOps.contain` resizes to, with Pillow's rounding (a side may round to 0)."""
    width, height = image_size
    if width / height > box[0] / box[1]:
        return box[0], round(height / width * box[0])
    if width / height < box[0] / box[1]:
        return round(width / height * box[1]), box[1]
    return box


def pad_image(img: Image.Image, box: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    """`ImageOps.pad`, except that the short side never rounds to 0 px.

    At aspect ratios of about 768:1 and beyond, Pillow (and so the reference) would raise "height and
    width must be > 0". Such an image is first resized to a 1-px short side, then padded as usual;
    every other image is padded bit-identically to `ImageOps.pad`.
    """
    fit = _contained_size(img.size, box)
    if min(fit) < 1:
        img = img.resize((max(fit[0], 1), max(fit[1], 1)), Image.Resampling.BICUBIC)
    return ImageOps.pad(img, box, color=color)


@dataclass
class VL2ImageProcessor:
    """Global view + row-major local tiles of `tile_size`, padded with `ImageOps.pad` semantics (see `pad_image`)."""

    tile_size: int = 384
    patch_size: int = 14
    downsample_ratio: int = 2
    candidate_resolutions: tuple[tuple[int, int], ...] = CANDIDATE_RESOLUTIONS
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD
    max_images_for_tiling: int = 2

    def __post_init__(self) -> None:
        self.candidate_resolutions = tuple(tuple(c) for c in self.candidate_resolutions)

    @property
    def tokens_per_side(self) -> int:
        """Tokens per tile side after the 2x2 projector unfold: ceil(27 / 2) = 14 for 384/14."""
        return math.ceil((self.tile_size // self.patch_size) / self.downsample_ratio)

    def grid_for(self, image_size: tuple[int, int], n_images_in_request: int) -> tuple[int, int]:
        """(num_width_tiles, num_height_tiles); tiling only when the request has <= 2 images."""
        if n_images_in_request <= self.max_images_for_tiling:
            best_w, best_h = select_best_resolution(image_size, self.candidate_resolutions)
        else:
            best_w, best_h = self.tile_size, self.tile_size
        return best_w // self.tile_size, best_h // self.tile_size

    def token_count(self, grid: tuple[int, int]) -> int:
        """Global rows with a newline each, one view separator, local rows with a newline each."""
        nw, nh = grid
        g = self.tokens_per_side
        return g * (g + 1) + 1 + (nh * g) * (nw * g + 1)

    def pad_color(self) -> tuple[int, int, int]:
        return background_color(self.mean)

    def views(self, img: Image.Image, grid: tuple[int, int]) -> list[Image.Image]:
        """[global view, tile(0,0), tile(0,1), ...] as PIL images of tile_size x tile_size."""
        nw, nh = grid
        size = self.tile_size
        color = self.pad_color()
        out = [pad_image(img, (size, size), color)]
        canvas = pad_image(img, (nw * size, nh * size), color)
        for y in range(0, nh * size, size):
            for x in range(0, nw * size, size):
                out.append(canvas.crop((x, y, x + size, y + size)))
        return out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std

    def __call__(self, img: Image.Image, n_images_in_request: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(1 + nw*nh, 3, S, S) normalised views and the (nw, nh) grid."""
        grid = self.grid_for(img.size, n_images_in_request)
        views = torch.stack([self.normalize(to_tensor(v)) for v in self.views(img, grid)])
        return views, grid


def image_token_count(image_size: tuple[int, int], n_images_in_request: int = 1) -> int:
    """Number of `<image>` tokens DeepSeek-VL2 spends on one image of (width, height)."""
    proc = VL2ImageProcessor()
    return proc.token_count(proc.grid_for(image_size, n_images_in_request))
