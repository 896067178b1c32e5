"""What the whole-model layer budgets (MEDA, VL-Cache) add to a prefill, measured side by side.

Two decoder layers with Qwen2.5-VL-7B's text dimensions (hidden 3584, 28 query heads, 4 KV heads,
head_dim 128; random weights, on the CPU) prefill T tokens whose middle 60% are "image" tokens (the
config gets an ``image_token_id``, so the press finds them in ``input_ids`` as it does in a VLM).
Each configuration compresses to 64 tokens per KV head:

* ``snapkv``: SnapKV, uniform budgets (the per-layer path: each layer compressed at its attention);
* ``snapkv+meda``: SnapKV under MEDA's cross-modal entropy (text x image attention of every query);
* ``snapkv+meda(prompt)``: SnapKV under the released MEDA code's whole-prompt attention entropy;
* ``vlcache``: VL-Cache as published (post-vision scoring + sparsity-aware layer budgets).

The whole-model allocators score every layer at its attention and compress all of them when the
decoder's forward returns; their statistic reads the layer's queries against all keys in blocks of
16 MB of logits. Printed as JSON: median wall time of each prefill and its ratio to the prefill
without a press, run back to back in each repeat so that machine load hits them alike; the kept
counts per layer (they must sum to ``L x 64``).

    python benchmarks/bench_layer_budgets.py --lengths 1024,2048 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from mmshiftkv.allocators import MEDAAllocator
from mmshiftkv.cache import cache_argument
from mmshiftkv.presses import BudgetedPress, SnapKVPress
from mmshiftkv.registry import make_press

BUDGET = 64
IMAGE_TOKEN = 5
CONFIGS: dict[str, Callable[[], BudgetedPress | None]] = {
    "none": lambda: None,
    "snapkv": lambda: SnapKVPress(budget=BUDGET),
    "snapkv+meda": lambda: SnapKVPress(budget=BUDGET, allocator=MEDAAllocator()),
    "snapkv+meda(prompt)": lambda: SnapKVPress(budget=BUDGET, allocator=MEDAAllocator(entropy="prompt")),
    "vlcache": lambda: make_press("vlcache", budget=BUDGET),
}


def two_layer_model(dtype: torch.dtype) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=2,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=65536,
        rope_theta=1e6,
    )
    config._attn_implementation = "sdpa"
    config.image_token_id = IMAGE_TOKEN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).to(dtype).eval()


def prompt(length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(10, 128, (1, length), generator=generator)
    ids[0, int(0.2 * length) : int(0.8 * length)] = IMAGE_TOKEN
    return ids


def prefill_seconds(model: Qwen2ForCausalLM, ids: torch.Tensor, press: BudgetedPress | None) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        if press is None:
            model(input_ids=ids, **cache_argument(model, DynamicCache()))
        else:
            with press(model):
                model(input_ids=ids, **cache_argument(model, DynamicCache()))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    model = two_layer_model(getattr(torch, args.dtype))
    results = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = prompt(length)
        presses = {name: make() for name, make in CONFIGS.items()}
        prefill_seconds(model, ids, None)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in presses}
        for _ in range(args.repeats):
            for name, press in presses.items():
                times[name].append(prefill_seconds(model, ids, press))
        plain = statistics.median(times["none"])
        results[str(length)] = {}
        for name, seconds in times.items():
            row = {"prefill_s": round(statistics.median(seconds), 3)}
            row["vs_no_press"] = round(statistics.median(seconds) / plain, 3)
            if presses[name] is not None:
                row["kept_per_layer"] = presses[name].stats.kept[:, 0, 0].tolist()
            results[str(length)][name] = row
    print(
        json.dumps(
            {
                "model": "2 Qwen2.5-VL-7B text layers, random weights, sdpa",
                "dtype": args.dtype,
                "budget": BUDGET,
                "image_share": 0.6,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
