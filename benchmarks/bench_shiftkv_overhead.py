"""ShiftKV's scoring time as a fraction of the prefill forward it rides on (issue 3).

One decoder layer with Qwen2.5-VL-7B's text dimensions (hidden 3584, 28 query heads, 4 KV heads,
head_dim 128, MLP 18944; random weights, float32 on the CPU) prefills T tokens; the ShiftKV press
(N=512 proxies, G=32 groups) compresses to 64 tokens per KV head. Printed as JSON: median prefill
time without a press, median time spent inside the press's scoring, and their ratio, side by side
in one run. The paper's released code adds +23% to prefill at 32K; our target is < 5% at 16K.

    python benchmarks/bench_shiftkv_overhead.py --lengths 1024,4096,16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from mmshiftkv import ShiftKVPress, ops


def qwen25vl_7b_layer(n_layers: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=n_layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=65536,
        rope_theta=1e6,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).eval()


def timed_prefill(model, embeds: torch.Tensor, press: ShiftKVPress | None) -> tuple[float, float]:
    """Wall time of one prefill forward, and the part of it spent in the press's scoring."""
    scoring = 0.0
    if press is not None:
        score = press.score

        def timed_score(*args, **kwargs):
            nonlocal scoring
            start = time.perf_counter()
            result = score(*args, **kwargs)
            scoring += time.perf_counter() - start
            return result

        press.score = timed_score
    start = time.perf_counter()
    with torch.no_grad():
        if press is None:
            model.model(inputs_embeds=embeds, past_key_values=DynamicCache())
        else:
            with press(model):
                model.model(inputs_embeds=embeds, past_key_values=DynamicCache())
    return time.perf_counter() - start, scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args()

    model = qwen25vl_7b_layer(args.layers)
    results = []
    for length in (int(n) for n in args.lengths.split(",")):
        embeds = torch.randn(1, length, 3584, generator=torch.Generator().manual_seed(length))
        repeats = args.repeats if length <= 4096 else 1
        plain = [timed_prefill(model, embeds, None)[0] for _ in range(repeats)]
        pressed = [timed_prefill(model, embeds, ShiftKVPress(budget=64)) for _ in range(repeats)]
        prefill_s = statistics.median(plain)
        scoring_s = statistics.median(s for _, s in pressed)
        results.append(
            {
                "prompt_tokens": length,
                "repeats": repeats,
                "prefill_s": round(prefill_s, 4),
                "prefill_with_press_s": round(statistics.median(t for t, _ in pressed), 4),
                "scoring_s": round(scoring_s, 4),
                "scoring_over_prefill": round(scoring_s / prefill_s, 4),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "shiftkv_scoring_overhead",
                "model": f"{args.layers} Qwen2.5-VL-7B text layer(s), fp32, cpu, random weights",
                "torch_threads": torch.get_num_threads(),
                "backend": ops.available(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
