"""Tiny random checkpoints and offline tokenizers for the vl tests.

Nothing is downloaded: tokenizers are trained here with the `tokenizers` library and carry the VL
special tokens; checkpoints are written by transformers' `save_pretrained` (HF layouts) or from the
state dict of our own modules (original layouts, whose names our modules share).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from demos.tiny import shrunk_language_config as vl2_tiny_language_config

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
VL1_SPECIALS = ["<image_placeholder>"]
VL2_SPECIALS = ["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"]
CORPUS = [
    "User: Describe the image.\n\nAssistant: A cat sits on a red mat near the window.",
    "What colour is the car? The car is blue. There are two dogs and a giraffe at the back.",
    "[[582, 271, 942, 888]] 0123456789 , . ? ! the a an of in on and is are",
]


def make_tokenizer(out_dir: Path, specials: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE with BOS/EOS/PAD first (ids 0, 1, 2) and the VL specials at the end."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.save_pretrained(str(out_dir))
    return fast


def padded_vocab(tokenizer) -> int:
    return (len(tokenizer) + 15) // 16 * 16


def llama_text_config(vocab: int, **overrides) -> dict:
    cfg = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Replace every parameter with seeded noise (norm weights around 1) so nothing is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# --- VL2 original layout -----------------------------------------------------------------------
VL2_TILE = 56  # 4x4 patches of 14 -> 2x2 tokens per tile after the projector
VL2_CANDIDATES = [[56, 56], [56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]


def vl2_vision_config() -> dict:
    return dict(
        model_name="siglip_so400m_patch14_384",
        image_size=VL2_TILE,
        patch_size=14,
        width=32,
        layers=2,
        heads=2,
        mlp_ratio=3.7362,
    )


def write_vl2_checkpoint(
    out_dir: Path,
    seed: int = 0,
    language_overrides: dict | None = None,
    global_view_pos: str = "head",
    vision: dict | None = None,
    candidates: list | None = None,
) -> Path:
    """An original-layout DeepSeek-VL2 folder (config.json, processor_config.json, tokenizer, weights)."""
    vision = vision or vl2_vision_config()
    candidates = candidates or VL2_CANDIDATES
    from vl.loading import vl2_config
    from vl.modeling_vl2 import DeepseekVL2

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir, VL2_SPECIALS)
    language = vl2_tiny_language_config(padded_vocab(tokenizer), **(language_overrides or {}))
    config = {
        "model_type": "deepseek_vl_v2",
        "tile_tag": "2D",
        "global_view_pos": global_view_pos,
        "candidate_resolutions": candidates,
        "vision_config": vision,
        "projector_config": {
            "projector_type": "downsample_mlp_gelu",
            "input_dim": vision["width"],
            "n_embed": language["hidden_size"],
            "depth": 2,
            "mlp_ratio": 1,
            "downsample_ratio": 2,
        },
        "language_config": language,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    processor = {
        "candidate_resolutions": candidates,
        "patch_size": 14,
        "downsample_ratio": 2,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "image_token": "<image>",
        "pad_token": PAD,
    }
    (out_dir / "processor_config.json").write_text(json.dumps(processor))
    torch.manual_seed(seed)
    model = DeepseekVL2(vl2_config(config, tokenizer.convert_tokens_to_ids("<image>")))
    randomize(model, seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    return out_dir


@pytest.fixture(scope="session")
def vl2_checkpoint(tmp_path_factory) -> Path:
    return write_vl2_checkpoint(tmp_path_factory.mktemp("vl2_tiny"))


@pytest.fixture(scope="session")
def vlh() -> SimpleNamespace:
    """This file's helpers for the tests (a conftest cannot be imported under --import-mode=importlib)."""
    return SimpleNamespace(
        VL1_SPECIALS=VL1_SPECIALS,
        VL2_SPECIALS=VL2_SPECIALS,
        make_tokenizer=make_tokenizer,
        padded_vocab=padded_vocab,
        llama_text_config=llama_text_config,
        vl2_tiny_language_config=vl2_tiny_language_config,
        randomize=randomize,
        noise_image=noise_image,
        write_vl2_checkpoint=write_vl2_checkpoint,
    )
