"""Command line: `python -m shared_moe generate --model PATH --prompt TEXT` streams a completion.

`--random-tiny` builds a small random-weight DeepSeek-V3-shaped checkpoint (MLA, grouped noaux_tc
router, MTP) in a temporary folder and decodes from it: a check that the install works on a machine
without weights. Its output is token ids from random weights, and it says so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import MoEConfig, MoEForCausalLM, cpu_ext, from_pretrained
from .pretrained import DTYPE_NAMES
from .speculative import mtp_generate


def build_random_tiny(folder: Path, seed: int = 0) -> Path:
    """A seeded random DeepSeek-V3-shaped checkpoint, written through the same save path users get."""
    config = MoEConfig(
        model_type="deepseek_v3", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=64,
        first_k_dense_replace=1, n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1, eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = MoEForCausalLM(config, num_mtp_layers=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def _generate(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        if args.random_tiny:
            print("Random-weight tiny DeepSeek-V3-shaped model (install check): the tokens below are meaningless.")
            folder = build_random_tiny(Path(scratch) / "tiny")
        else:
            folder = Path(args.model)
        model = from_pretrained(folder, dtype=args.dtype, device=args.device, load_mtp=args.use_mtp)
        print(f"loaded {folder.name}: {model.config.model_type}, {sum(p.numel() for p in model.parameters()):,} "
              f"parameters, {'MLA' if model.config.use_mla else 'MHA'}, {len(model.mtp_layers)} MTP layer(s)")
        tokenizer = None if args.random_tiny else _tokenizer(folder)
        if tokenizer is None:
            prompt_ids = torch.tensor([[int(t) for t in (args.prompt_ids or "2 3 4 5").split()]])
        else:
            prompt_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        prompt_ids = prompt_ids.to(model.device)
        eos = model.config.eos_token_id if tokenizer is None else tokenizer.eos_token_id
        if model.device.type == "cpu":
            cpu_ext.available()  # a first run compiles the C++ CPU ops (10-20 s): not decode time
        start = time.perf_counter()
        if args.use_mtp:
            result = mtp_generate(model, prompt_ids, args.max_new_tokens, eos_token_id=eos)
            new = result.tokens[0, prompt_ids.shape[1] :].tolist()
            print(_decode(tokenizer, new))
            print(f"MTP drafts accepted: {result.accepted}/{result.drafted}")
        else:
            new = []
            sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p)
            for token in model.stream(prompt_ids, args.max_new_tokens, eos_token_id=eos, **sampling):
                new.append(int(token[0]))
                print(_decode(tokenizer, [new[-1]]), end=" " if tokenizer is None else "", flush=True)
            print()
        elapsed = time.perf_counter() - start
        print(f"{len(new)} tokens in {elapsed:.2f} s ({len(new) / elapsed:.1f} tokens/s)")
    return 0


def _tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        print(f"no tokenizer in {folder} ({error.__class__.__name__}); reading --prompt-ids instead", file=sys.stderr)
        return None


def _decode(tokenizer, ids: list[int]) -> str:
    return " ".join(map(str, ids)) if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared_moe", description="DeepSeek MoE language core")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream a completion from a local Hugging Face checkpoint")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder (config.json + safetensors [+ tokenizer])")
    source.add_argument("--random-tiny", action="store_true", help="random tiny V3-shaped model (install check)")
    gen.add_argument("--prompt", default="Hello")
    gen.add_argument("--prompt-ids", help="space-separated token ids when the folder has no tokenizer")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--dtype", choices=DTYPE_NAMES, default="auto")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--use-mtp", action="store_true", help="greedy speculative decoding with the MTP module")
    args = parser.parse_args(argv)
    return _generate(args)


if __name__ == "__main__":
    raise SystemExit(main())
