"""A small random-weight DeepSeek-VL2-shaped model and an offline tokenizer.

`python -m demos --random-tiny-vl` uses this so the chat tab runs on a fresh machine with no
checkpoint and no network. The structure is DeepSeek-VL2-Tiny's (SigLIP-SO400M/14 tower on 384
tiles with tanh GELU, 2x2 downsampling projector, MHA + DeepSeekMoE language model with a dense
first layer, the released tiling candidates and chat template), with widths and depths shrunk.
The weights are random, so replies are noise: the UI says so.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vl import VL2ChatProcessor, VL2Config, VL2ImageProcessor
from vl.modeling_vl2 import VL2_TINY_LANGUAGE, DeepseekVL2
from vl.siglip import SigLIPConfig

BOS, EOS, PAD, UNK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<unk>"
VL2_SPECIAL_TOKENS = (
    "<image>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    "<|User|>",
    "<|Assistant|>",
)
# Text the BPE merges are learned from: enough English and grounding syntax that random replies
# decode to word pieces rather than single bytes.
CORPUS = (
    "<|User|>: Describe the image.\n\n<|Assistant|>: A cat sits on a red mat near the window.",
    "What colour is the car? The car is blue. There are two dogs and a giraffe at the back.",
    "The person on the left holds an umbrella; the sky is grey and it is raining on the street.",
    "<|ref|>The giraffe at the back.<|/ref|><|det|>[[582, 271, 942, 888]]<|/det|>",
    "0123456789 , . ? ! : ; the a an of in on and is are with this that there here image picture",
)
RANDOM_WEIGHTS_LABEL = "random-tiny-vl2 (RANDOM WEIGHTS: replies are noise, for trying the UI only)"


def make_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """BPE over printable ASCII with DeepSeek's BOS/EOS/PAD (ids 0, 1, 2), `<unk>` and the VL2 specials.

    Not byte-level on purpose: every token decodes to printable text, so a random reply reads as
    visible noise instead of broken UTF-8. Characters outside printable ASCII become `<unk>`.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    fast.add_special_tokens({"additional_special_tokens": list(VL2_SPECIAL_TOKENS)})
    return fast


def shrunk_language_config(vocab_size: int, **overrides) -> dict:
    """VL2-Tiny's released language config (MHA, dense layer 0, softmax greedy DeepSeekMoE), shrunk."""
    return {
        **VL2_TINY_LANGUAGE,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        **overrides,
    }


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> VL2Config:
    """VL2-Tiny's configuration with small widths; the vocabulary is exactly the tokenizer's."""
    language = shrunk_language_config(
        len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    vision = SigLIPConfig(
        image_size=384, patch_size=14, width=32, layers=2, heads=2, mlp_dim=120, gelu_approximate="tanh"
    )
    return VL2Config(language=language, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision=vision)


def build_random_tiny_vl(seed: int = 0, tag_policy: str = "fix") -> tuple[DeepseekVL2, VL2ChatProcessor]:
    """(model, processor) with seeded random weights; the global torch RNG is left untouched."""
    tokenizer = make_tokenizer()
    cfg = tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        model = DeepseekVL2(cfg)
    model.init_random_weights_(std=0.1, seed=seed)
    image_processor = VL2ImageProcessor(tile_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size)
    processor = VL2ChatProcessor(tokenizer, image_processor, tag_policy=tag_policy)
    return model.eval(), processor
