"""Prefill and decode time of `vl` against transformers' DeepseekVLHybrid on the same random weights.

A DeepseekVLHybridForConditionalGeneration is built from a reduced config (real 384/16 SigLIP geometry
with 576 image tokens, a SAM at `--sam-size`, a Llama LM), saved with `save_pretrained`, and loaded
through `vl.load`. Both sides get identical pixels and token ids; greedy decoding, KV cache on both.

    python bench/bench_vl.py                      # default preset, ~1 min on 2 CPU cores
    python bench/bench_vl.py --new-tokens 64 --repeats 5 --json out.json
    python bench/bench_vl.py --mode vl2-tiny --repeats 1 --new-tokens 16   # real VL2-Tiny shapes, ~14 GB RAM
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessor,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vl  # noqa: E402  (run from a checkout without installing)

LOW_MEAN = LOW_STD = (0.5, 0.5, 0.5)
HIGH_MEAN, HIGH_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def make_tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    """A small offline byte-level BPE with DeepSeek's BOS/EOS and the given special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Describe the image in detail. A cat sits on a mat."] * 8, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def build_checkpoint(out: Path, args) -> DeepseekVLHybridForConditionalGeneration:
    fast = make_tokenizer(["<image_placeholder>"])
    fast.save_pretrained(str(out))
    text = dict(
        model_type="llama",
        hidden_size=args.lm_hidden,
        intermediate_size=args.lm_hidden * 11 // 4,
        num_hidden_layers=args.lm_layers,
        num_attention_heads=args.lm_hidden // 64,
        num_key_value_heads=args.lm_hidden // 64,
        vocab_size=args.vocab,
        rms_norm_eps=1e-6,
    )
    siglip = dict(
        model_type="siglip_vision_model",
        hidden_size=args.siglip_width,
        intermediate_size=4 * args.siglip_width,
        num_hidden_layers=args.siglip_layers,
        num_attention_heads=args.siglip_width // 64,
        image_size=384,
        patch_size=16,
        hidden_act="gelu",
    )
    sam = dict(
        model_type="sam_vision_model",
        hidden_size=args.sam_width,
        output_channels=256,
        num_hidden_layers=args.sam_layers,
        num_attention_heads=args.sam_width // 64,
        image_size=args.sam_size,
        patch_size=16,
        global_attn_indexes=list(range(2, args.sam_layers, 3)),
        window_size=14,
        mlp_dim=4 * args.sam_width,
    )
    cfg = DeepseekVLHybridConfig(
        text_config=text,
        vision_config=siglip,
        high_res_vision_config=sam,
        image_token_id=fast.convert_tokens_to_ids("<image_placeholder>"),
    )
    torch.manual_seed(0)
    ref = DeepseekVLHybridForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        ref.model.high_res_vision_alpha.fill_(0.3)
    ref.save_pretrained(str(out))
    DeepseekVLHybridImageProcessor(
        size={"height": 384, "width": 384},
        high_res_size={"height": args.sam_size, "width": args.sam_size},
        image_mean=LOW_MEAN,
        image_std=LOW_STD,
        high_res_image_mean=HIGH_MEAN,
        high_res_image_std=HIGH_STD,
    ).save_pretrained(str(out))
    return ref


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def run_transformers(ref, batch, new_tokens: int) -> tuple[float, float, list[int]]:
    x = batch.pixel_values[:, 0]
    pixel_values = normalize(F.interpolate(x, size=(384, 384), mode="bilinear", antialias=True), LOW_MEAN, LOW_STD)
    high = normalize(x, HIGH_MEAN, HIGH_STD)
    mask = batch.attention_mask
    start = time.perf_counter()
    out = ref(
        input_ids=batch.input_ids,
        pixel_values=pixel_values,
        high_res_pixel_values=high,
        attention_mask=mask,
        use_cache=True,
        logits_to_keep=1,
    )
    token = out.logits[:, -1].argmax(-1)
    prefill = time.perf_counter() - start
    tokens = [int(token)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        out = ref(input_ids=token[:, None], past_key_values=out.past_key_values, attention_mask=mask, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        tokens.append(int(token))
    return prefill, (time.perf_counter() - start) / max(new_tokens - 1, 1), tokens


@torch.no_grad()
def run_vl(model, batch, new_tokens: int) -> tuple[float, float, list[int]]:
    start = time.perf_counter()
    steps = model.stream(batch, max_new_tokens=new_tokens)
    tokens = [int(next(steps))]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens += [int(t) for t in steps]
    return prefill, (time.perf_counter() - start) / max(new_tokens - 1, 1), tokens


def build_vl2_tiny(seed: int = 0):
    """DeepSeek-VL2-Tiny at its real shapes (SO400M/14 tower, 1280-wide 64-expert MoE), random weights."""
    tokenizer = make_tokenizer(["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"])
    # Cover the whole 129,280-id vocabulary with filler tokens "<tN>", so a random-weight reply decodes to text.
    vocab = vl.modeling_vl2.VL2_TINY_LANGUAGE["vocab_size"]
    tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), vocab)])
    cfg = vl.VL2Config(
        language=vl.modeling_vl2.VL2_TINY_LANGUAGE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision=vl.loading.siglip_from_params({"model_name": "siglip_so400m_patch14_384"}, "tanh"),
    )
    model = vl.loading.materialize(vl.DeepseekVL2, cfg, "cpu", torch.float32)
    model.init_random_weights_(std=0.02, seed=seed)
    processor = vl.VL2ChatProcessor(tokenizer, vl.VL2ImageProcessor())
    return model.eval(), processor


def bench_vl2_tiny(args) -> dict:
    """One chat about a 1024x768 image: prefill (7 tiles + 1415 image tokens) and decode time."""
    start = time.perf_counter()
    model, processor = build_vl2_tiny()
    build_s = time.perf_counter() - start
    rng = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(768, 1024, 3, generator=rng) * 255).to(torch.uint8).numpy())
    conv = [{"role": "user", "content": "<image>\nDescribe the image in detail."}]
    batch = processor(conv, [image])
    runs = [run_vl(model, batch, args.new_tokens) for _ in range(args.repeats)]
    text = processor.tokenizer.decode(runs[0][2], skip_special_tokens=False)
    summary = {
        "mode": "vl2-tiny",
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_s": build_s,
        "prompt_tokens": int(batch.input_ids.shape[1]),
        "image_tokens": int(batch.images_seq_mask.sum()),
        "views": int(batch.pixel_values.shape[1]),
        "prefill_s": statistics.median(r[0] for r in runs),
        "decode_ms_per_token": 1000 * statistics.median(r[1] for r in runs),
        "reply_ids": runs[0][2],
        "reply": text,
    }
    print(
        f"VL2-Tiny shapes ({summary['parameters'] / 1e9:.2f} B params, {summary['views']} views, "
        f"{summary['prompt_tokens']} prompt tokens): prefill {summary['prefill_s']:.2f} s, "
        f"decode {summary['decode_ms_per_token']:.0f} ms/token\nreply: {text!r}"
    )
    return summary


def bench_hybrid(args) -> dict:
    """vl against transformers' DeepseekVLHybrid on the same weights."""
    with tempfile.TemporaryDirectory() as tmp:
        ref = build_checkpoint(Path(tmp), args)
        model, processor = vl.load(tmp)
    conv = [{"role": "user", "content": "<image_placeholder>Describe the image in detail."}]
    rng = torch.Generator().manual_seed(0)
    image = (torch.rand(600, 800, 3, generator=rng) * 255).to(torch.uint8).numpy()
    batch = processor(conv, [Image.fromarray(image)])
    results = {}
    for name, fn, target in (("transformers", run_transformers, ref), ("vl", run_vl, model)):
        runs = [fn(target, batch, args.new_tokens) for _ in range(args.repeats)]
        results[name] = {
            "prefill_s": statistics.median(r[0] for r in runs),
            "decode_ms_per_token": 1000 * statistics.median(r[1] for r in runs),
            "tokens": runs[0][2],
        }
    same = results["vl"]["tokens"] == results["transformers"]["tokens"]
    summary = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "prompt_tokens": int(batch.input_ids.shape[1]),
        "image_tokens": int(batch.images_seq_mask.sum()),
        "torch": torch.__version__,
        "same_greedy_tokens": same,
        **{name: {k: v for k, v in r.items() if k != "tokens"} for name, r in results.items()},
    }
    for name in ("transformers", "vl"):
        r = results[name]
        print(f"{name:>12}: prefill {r['prefill_s']:.3f} s   decode {r['decode_ms_per_token']:.1f} ms/token")
    speed = results["transformers"]["prefill_s"] / results["vl"]["prefill_s"]
    decode = results["transformers"]["decode_ms_per_token"] / results["vl"]["decode_ms_per_token"]
    print(f"vl speed-up: prefill x{speed:.2f}, decode x{decode:.2f}; identical greedy tokens: {same}")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("hybrid", "vl2-tiny"), default="hybrid")
    p.add_argument("--sam-size", type=int, default=512, help="SAM input side (1024 in DeepSeek-VL 7B)")
    p.add_argument("--sam-width", type=int, default=384)
    p.add_argument("--sam-layers", type=int, default=6)
    p.add_argument("--siglip-width", type=int, default=384)
    p.add_argument("--siglip-layers", type=int, default=6)
    p.add_argument("--lm-hidden", type=int, default=512)
    p.add_argument("--lm-layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    summary = bench_hybrid(args) if args.mode == "hybrid" else bench_vl2_tiny(args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
