"""MLA decode step over a long latent cache: shared_moe (absorbed) vs transformers' DeepseekV3Attention.

DeepSeek-V2-Lite attention dims (hidden 2048, 16 heads, kv_lora_rank 512, nope 128, rope 64, v 128,
no q-LoRA). Both sides hold the same compressed cache (transformers >= 5.23 caches the latent too);
transformers re-projects every cached latent through kv_b_proj at each step, we attend in latent space.

    python bench/bench_mla.py [--cache 4096] [--repeats 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from transformers import DeepseekV3Config
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds, print_table  # noqa: E402

from shared_moe import MoEConfig  # noqa: E402
from shared_moe.attention import MultiHeadLatentAttention  # noqa: E402
from shared_moe.cache import LatentCache  # noqa: E402
from shared_moe.rope import RotaryEmbedding  # noqa: E402


def build(dtype: torch.dtype):
    config = DeepseekV3Config(
        hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=1000,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = DeepseekV3Attention(config, layer_idx=0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
        hf.kv_a_layernorm.weight.fill_(1.0)
    ours_config = MoEConfig.from_hf(config.to_dict())
    ours = MultiHeadLatentAttention(ours_config)
    ours.load_state_dict(hf.state_dict())
    return config, hf.to(dtype).eval(), ours.to(dtype).eval(), ours_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    if len(dtypes) > 1:
        # One process per dtype: the allocator state left by one dtype's large temporaries skews the next one's
        # timings by up to 30x on this machine. Each process still times both implementations side by side.
        for name in dtypes:
            command = [sys.executable, __file__, "--cache", str(args.cache), "--repeats", str(args.repeats),
                       "--dtypes", name]
            subprocess.run(command, check=True)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one decode token over {args.cache} cached")
    rows = []
    for dtype in [getattr(torch, name) for name in dtypes]:
        config, hf, ours, ours_config = build(dtype)
        gen = torch.Generator().manual_seed(1)
        history = (torch.randn(1, args.cache, 2048, generator=gen) * 0.5).to(dtype)
        token = (torch.randn(1, 1, 2048, generator=gen) * 0.5).to(dtype)
        positions = torch.arange(args.cache + 1)[None]

        hf_rotary = DeepseekV3RotaryEmbedding(config)
        hf_cache = DynamicCache(config=config)
        ours_rotary = RotaryEmbedding(ours_config.rope_dim, ours_config.rope_parameters)
        ours_cache = LatentCache()
        with torch.no_grad():
            # Fill both caches by prefilling the same history.
            hf(history, hf_rotary(history, positions[:, :-1]), None, past_key_values=hf_cache)
            ours(history, ours_rotary(positions[:, :-1]), None, ours_cache)
            hf_step_rope = hf_rotary(token, positions[:, -1:])
            ours_step_rope = ours_rotary(positions[:, -1:])

            def hf_step():
                out = hf(token, hf_step_rope, None, past_key_values=hf_cache)[0]
                hf_cache.crop(-1)
                return out

            def ours_step():
                out = ours(token, ours_step_rope, None, ours_cache)
                ours_cache.latent.crop(args.cache)
                return out

            error = (hf_step().float() - ours_step().float()).abs().max().item()
            scale = hf_step().float().abs().max().item()
            hf_time = median_seconds(hf_step, args.repeats)
            ours_time = median_seconds(ours_step, args.repeats)
        label = str(dtype).removeprefix("torch.")
        rows.append([label, args.cache, f"{hf_time * 1e3:.2f}", f"{ours_time * 1e3:.2f}", f"{hf_time / ours_time:.1f}x",
                     f"{error:.1e} (of {scale:.1e})"])
    print_table(
        "MLA decode step (median ms)",
        ["dtype", "cached tokens", "transformers", "shared_moe", "speed-up", "max abs diff"],
        rows,
    )


if __name__ == "__main__":
    main()
