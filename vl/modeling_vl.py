"""DeepSeek-VL (v1): SigLIP-L (1.3B) or the SAM-B + SigLIP-L hybrid encoder (7B), an MLP aligner,
and a Llama-shaped language model on the shared core. 576 image tokens per image at full size.

Attribute names follow the original checkpoint (`vision_model.vision_tower_high.vision_tower.*`,
`aligner.*`, `language_model.*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared_moe import MoEConfig, MoEForCausalLM

from .batch import VisionLanguageModel, VLBatch
from .image_processing import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from .projector import HybridSplitMlpProjector, MlpProjector
from .sam import SAMConfig, SAMEncoder
from .siglip import SigLIPConfig, SigLIPViT

ALIGNER_TYPES = ("mlp_gelu", "low_high_hybrid_split_mlp_gelu")


@dataclass
class VLConfig:
    """`high=None` is the single-tower 1.3B layout; otherwise the 7B hybrid."""

    low: SigLIPConfig
    language: dict[str, Any]
    image_token_id: int
    high: SAMConfig | None = None
    aligner_type: str = "mlp_gelu"
    aligner_depth: int = 2
    low_mean: tuple[float, ...] = SIGLIP_MEAN
    low_std: tuple[float, ...] = SIGLIP_STD
    high_mean: tuple[float, ...] = CLIP_MEAN
    high_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        if self.aligner_type not in ALIGNER_TYPES:
            raise ValueError(f"aligner {self.aligner_type!r} is not supported; expected one of {ALIGNER_TYPES}")
        if (self.high is None) != (self.aligner_type == "mlp_gelu"):
            raise ValueError("the hybrid tower needs the low_high_hybrid_split_mlp_gelu aligner and vice versa")
        if self.high is not None and self.high.out_grid**2 != self.low.num_patches:
            raise ValueError(
                f"SAM gives {self.high.out_grid**2} tokens but SigLIP {self.low.num_patches}; they must match"
            )

    @property
    def image_size(self) -> int:
        """Side of the square the processor produces (1024 for the hybrid, 384 otherwise)."""
        return self.high.image_size if self.high is not None else self.low.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.low.num_patches


class CLIPVisionTower(nn.Module):
    """Normalise [0, 1] pixels with the tower's own mean/std, then run the backbone."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.vision_tower = backbone
        self.mean, self.std = tuple(mean), tuple(std)  # plain floats: nothing to initialise or cast

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return self.vision_tower((pixels - mean) / std)


class HybridVisionTower(nn.Module):
    """(B, 3, 1024, 1024) in [0, 1] -> (high: SAM (B, 576, 1024), low: SigLIP at 384 (B, 576, 1024))."""

    def __init__(self, cfg: VLConfig):
        super().__init__()
        self.low_size = cfg.low.image_size
        self.vision_tower_high = CLIPVisionTower(SAMEncoder(cfg.high), cfg.high_mean, cfg.high_std)
        self.vision_tower_low = CLIPVisionTower(SigLIPViT(cfg.low), cfg.low_mean, cfg.low_std)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        high = self.vision_tower_high(pixels).flatten(2).transpose(1, 2)
        return high, self.vision_tower_low(self.resize_low(pixels))

    def resize_low(self, pixels: torch.Tensor) -> torch.Tensor:
        """Bilinear antialiased resize to the SigLIP size, computed in fp32 and cast back.

        PyTorch's CPU antialiased bilinear kernel has no bf16/fp16 implementation, so resizing in the
        model dtype would make a half-precision hybrid model fail on CPU.
        """
        size = (self.low_size, self.low_size)
        return F.interpolate(pixels.float(), size=size, mode="bilinear", antialias=True).to(pixels.dtype)


class DeepseekVL(VisionLanguageModel):
    def __init__(self, cfg: VLConfig):
        super().__init__()
        self.cfg = cfg
        lm_config = MoEConfig.from_hf(cfg.language)
        n_embed = lm_config.hidden_size
        if cfg.high is None:
            self.vision_model = CLIPVisionTower(SigLIPViT(cfg.low), cfg.low_mean, cfg.low_std)
            self.aligner = MlpProjector(cfg.low.width, n_embed, cfg.aligner_depth)
        else:
            self.vision_model = HybridVisionTower(cfg)
            self.aligner = HybridSplitMlpProjector(cfg.high.out_channels, cfg.low.width, n_embed, cfg.aligner_depth)
        self.language_model = MoEForCausalLM(lm_config)

    @property
    def lm(self) -> MoEForCausalLM:
        return self.language_model

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) in [0, 1] -> (n, num_image_tokens, hidden)."""
        return self.aligner(self.vision_model(pixels))

    def image_embeds(self, batch: VLBatch) -> list[torch.Tensor]:
        # Only real images go through the towers; padding images of the batch are skipped.
        real = batch.images_emb_mask.any(-1)
        features = self.encode_images(batch.pixel_values[real].to(self.vision_dtype))
        counts = real.sum(1).tolist()
        return [f.flatten(0, 1) for f in features.split(counts)]

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_model.parameters()).dtype
