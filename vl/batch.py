"""The tensors a processor hands to a model, and the model-side plumbing shared by VL1 and VL2."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from shared_moe import CausalLMOutput, MoEForCausalLM


@dataclass
class VLBatch:
    """A left-padded batch.

    input_ids / attention_mask / images_seq_mask: (B, T); image positions hold the image token id.
    pixel_values: VL1 (B, max_images, 3, S, S) in [0, 1]; VL2 (B, max_views, 3, 384, 384) normalised.
    images_emb_mask: VL1 only, (B, max_images, tokens_per_image), True for real images.
    images_spatial_crop: VL2 only, (B, max_images, 2) of (num_width_tiles, num_height_tiles), 0 = none.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images_seq_mask: torch.Tensor
    pixel_values: torch.Tensor
    images_emb_mask: torch.Tensor | None = None
    images_spatial_crop: torch.Tensor | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VLBatch:
        """Move everything to `device`; only the pixels change dtype."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device) if v is not None else None for k, v in moved.items()}
        if dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return replace(self, **moved)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def scatter_image_embeds(
    embeds: torch.Tensor, images_seq_mask: torch.Tensor, image_embeds: list[torch.Tensor]
) -> torch.Tensor:
    """Write each sample's image features, in order, into its image-token positions."""
    embeds = embeds.clone()
    for i, features in enumerate(image_embeds):
        positions = images_seq_mask[i].nonzero().squeeze(1)
        if positions.numel() != features.shape[0]:
            raise ValueError(
                f"sample {i}: {positions.numel()} image-token positions but {features.shape[0]} image features"
            )
        embeds[i, positions] = features.to(embeds.dtype)
    return embeds


class VisionLanguageModel(nn.Module, ABC):
    """Images -> embeddings merged into the token embeddings -> the shared MoE language core."""

    @property
    @abstractmethod
    def lm(self) -> MoEForCausalLM:
        """The language core (each model names its attribute as its checkpoint does)."""

    @abstractmethod
    def image_embeds(self, batch: VLBatch) -> list[torch.Tensor]:
        """Per sample, the (n_image_tokens, hidden) features for its image-token positions."""

    @torch.no_grad()
    def init_random_weights_(self, std: float, seed: int) -> VisionLanguageModel:
        """Seeded N(0, std) weights with norm scales at 1: a model to try the pipeline without a checkpoint."""
        gen = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
        return self

    def prepare_inputs_embeds(self, batch: VLBatch) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(batch.input_ids.clamp(min=0))
        if not bool(batch.images_seq_mask.any()):
            return embeds  # pure text request: the vision towers never run
        return scatter_image_embeds(embeds, batch.images_seq_mask, self.image_embeds(batch))

    def forward(self, batch: VLBatch, cache=None, logits_to_keep: int = 0) -> CausalLMOutput:
        return self.lm(
            inputs_embeds=self.prepare_inputs_embeds(batch),
            attention_mask=batch.attention_mask,
            cache=cache,
            logits_to_keep=logits_to_keep,
        )

    def _generation_inputs(self, batch: VLBatch) -> dict:
        with torch.no_grad():
            embeds = self.prepare_inputs_embeds(batch)
        return dict(input_ids=batch.input_ids, inputs_embeds=embeds, attention_mask=batch.attention_mask)

    def generate(self, batch: VLBatch, max_new_tokens: int = 32, **gen) -> torch.Tensor:
        """(B, new) generated token ids; `gen` are `shared_moe` generation arguments."""
        prompt_len = batch.input_ids.shape[1]
        out = self.lm.generate(max_new_tokens=max_new_tokens, **self._generation_inputs(batch), **gen)
        return out[:, prompt_len:]

    def stream(self, batch: VLBatch, max_new_tokens: int = 32, **gen) -> Iterator[torch.Tensor]:
        """Yields (B,) new token ids per step."""
        yield from self.lm.stream(max_new_tokens=max_new_tokens, **self._generation_inputs(batch), **gen)
