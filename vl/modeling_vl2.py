"""DeepSeek-VL2: SigLIP-SO400M/14 on 384 tiles, a 2x2-downsampling MLP projector, learned row and
view tags (`image_newline`, `view_seperator` -- the typo is the checkpoint's), and a DeepSeekMoE
language model (tiny: MHA, small: MLA + softmax, base: MLA + sigmoid noaux_tc) on the shared core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared_moe import MoEConfig, MoEForCausalLM

from .batch import VisionLanguageModel, VLBatch
from .image_processing import CANDIDATE_RESOLUTIONS
from .projector import DownsampleMlpProjector
from .siglip import SigLIPConfig, SigLIPViT

# The `language_config` of the released DeepSeek-VL2-Tiny: MHA (no MLA), dense layer 0, then
# DeepSeekMoE with 64 routed experts (softmax, greedy top-6, no renormalisation) and 2 shared experts.
VL2_TINY_LANGUAGE: dict[str, Any] = {
    "model_type": "deepseek_v2",
    "vocab_size": 129280,
    "hidden_size": 1280,
    "intermediate_size": 6848,
    "num_hidden_layers": 12,
    "num_attention_heads": 10,
    "num_key_value_heads": 10,
    "use_mla": False,
    "kv_lora_rank": None,
    "q_lora_rank": None,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 896,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


@dataclass
class VL2Config:
    language: dict[str, Any]
    image_token_id: int
    vision: SigLIPConfig
    projector_depth: int = 2
    projector_mlp_ratio: int = 1
    downsample_ratio: int = 2
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: tuple[tuple[int, int], ...] = CANDIDATE_RESOLUTIONS

    def __post_init__(self) -> None:
        if self.tile_tag != "2D":
            raise ValueError(f"tile_tag {self.tile_tag!r} is not supported (only '2D' is used by released models)")
        if self.global_view_pos not in ("head", "tail"):
            raise ValueError(f"global_view_pos must be 'head' or 'tail', got {self.global_view_pos!r}")


def tile_layout(
    global_view: torch.Tensor,
    local_views: torch.Tensor,
    grid: tuple[int, int],
    newline: torch.Tensor,
    separator: torch.Tensor,
    global_view_pos: str = "head",
) -> torch.Tensor:
    """Token sequence of one image: rows of the global grid and of the stitched local grid, each
    followed by `newline`, with `separator` between the two blocks.

    global_view: (g*g, D); local_views: (nh*nw, g*g, D) row-major tiles; returns
    (g*(g+1) + 1 + nh*g*(nw*g + 1), D).
    """
    nw, nh = grid
    g = int(global_view.shape[0] ** 0.5)
    dim = global_view.shape[-1]
    glob = global_view.view(g, g, dim)
    glob = torch.cat([glob, newline.expand(g, 1, dim)], dim=1).reshape(-1, dim)
    local = local_views.view(nh, nw, g, g, dim).permute(0, 2, 1, 3, 4).reshape(nh * g, nw * g, dim)
    local = torch.cat([local, newline.expand(nh * g, 1, dim)], dim=1).reshape(-1, dim)
    sep = separator.view(1, dim)
    parts = [glob, sep, local] if global_view_pos == "head" else [local, sep, glob]
    return torch.cat(parts, dim=0)


class DeepseekVL2(VisionLanguageModel):
    def __init__(self, cfg: VL2Config):
        super().__init__()
        self.cfg = cfg
        lm_config = MoEConfig.from_hf(cfg.language)
        n_embed = lm_config.hidden_size
        self.vision = SigLIPViT(cfg.vision)
        self.projector = DownsampleMlpProjector(
            cfg.vision.width, n_embed, cfg.projector_depth, cfg.projector_mlp_ratio, cfg.downsample_ratio
        )
        scale = n_embed**-0.5
        self.image_newline = nn.Parameter(torch.randn(n_embed) * scale)
        self.view_seperator = nn.Parameter(torch.randn(n_embed) * scale)
        self.language = MoEForCausalLM(lm_config)

    @property
    def lm(self) -> MoEForCausalLM:
        return self.language

    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, 384, 384) normalised tiles -> (V, 196, hidden)."""
        return self.projector(self.vision(views))

    def image_embeds(self, batch: VLBatch) -> list[torch.Tensor]:
        crops = batch.images_spatial_crop.tolist()
        grids = [[(nw, nh) for nw, nh in sample if nw > 0 and nh > 0] for sample in crops]
        n_views = [sum(1 + nw * nh for nw, nh in sample) for sample in grids]
        views = torch.cat([batch.pixel_values[i, :n] for i, n in enumerate(n_views)])
        dtype = self.vision.pos_embed.dtype
        features = self.encode_views(views.to(dtype)).split(n_views)
        out = []
        for sample_grids, sample_features in zip(grids, features):
            sequences, k = [], 0
            for nw, nh in sample_grids:
                sequences.append(
                    tile_layout(
                        sample_features[k],
                        sample_features[k + 1 : k + 1 + nw * nh],
                        (nw, nh),
                        self.image_newline,
                        self.view_seperator,
                        self.cfg.global_view_pos,
                    )
                )
                k += 1 + nw * nh
            out.append(torch.cat(sequences) if sequences else sample_features.new_zeros(0, self.image_newline.shape[0]))
        return out
