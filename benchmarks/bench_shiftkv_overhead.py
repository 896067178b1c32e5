"""ShiftKV's and SnapKV's scoring time as a fraction of the prefill forward they ride on.

One decoder layer with Qwen2.5-VL-7B's text dimensions (hidden 3584, 28 query heads, 4 KV heads,
head_dim 128, MLP 18944; random weights, on the CPU) prefills T tokens; ShiftKVPress (N=512
proxies, G=32 groups) and SnapKVPress (window 32, kernel 5) each compress to 64 tokens per KV
head. Printed as JSON: median prefill time without a press and the median time spent inside each
press's ``score`` (everything the press adds: statistics, proxy projection, RoPE, the op), with
their ratios (``scoring_*``: ShiftKV, ``snapkv_scoring_*``: SnapKV). Each press is made once and
serves every repeat, as a press serving requests does; ShiftKV's first call (which also projects
the layer's fixed proxy noise, kept on the press) is reported as ``first_scoring_s``.
``logits_floor_*`` times the bare float32 GEMMs of ShiftKV's proxy logits (N x 28 heads x T x
128, the work no exact implementation can skip) in the same repeat. Within one repeat the forwards
and the GEMM run back to back, so machine load hits them alike. The paper's released code adds
+23% to prefill at 32K.

    python benchmarks/bench_shiftkv_overhead.py --lengths 1024,4096,16384 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from mmshiftkv import ShiftKVPress, SnapKVPress, ops

BUDGET = 64
FLOOR_BLOCK_ROWS = 256
PRESSES = {"shiftkv": lambda: ShiftKVPress(budget=BUDGET), "snapkv": lambda: SnapKVPress(budget=BUDGET)}


def qwen25vl_7b_layer(n_layers: int, dtype: torch.dtype) -> Qwen2ForCausalLM:
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
        return Qwen2ForCausalLM(config).to(dtype).eval()


class ScoringTimer:
    """Wraps a press's ``score`` once and adds up the time spent in it."""

    def __init__(self, press) -> None:
        self.press, self.seconds = press, 0.0
        score = press.score

        def timed_score(*args, **kwargs):
            start = time.perf_counter()
            result = score(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return result

        press.score = timed_score

    def prefill(self, model, embeds: torch.Tensor) -> float:
        """Scoring seconds of one prefill under the press."""
        self.seconds = 0.0
        with torch.no_grad(), self.press(model):
            model.model(inputs_embeds=embeds, past_key_values=DynamicCache())
        return self.seconds


def plain_prefill(model, embeds: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.model(inputs_embeds=embeds, past_key_values=DynamicCache())
    return time.perf_counter() - start


def logits_floor(length: int, n_proxies: int) -> float:
    """Seconds of the float32 GEMMs of every query proxy against the prompt keys (all KV heads).

    In blocks of ``FLOOR_BLOCK_ROWS`` rows into one reused buffer, as the op issues them (one
    unblocked GEMM would mostly time writing a ``7 n_proxies x T`` output to memory).
    """
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 7 * n_proxies, 128, generator=generator)
    keys = torch.randn(4, length, 128, generator=generator)
    logits = torch.empty(FLOOR_BLOCK_ROWS, length)
    start = time.perf_counter()
    for head_rows, head_keys in zip(rows, keys):
        for block in head_rows.split(FLOOR_BLOCK_ROWS):
            torch.mm(block, head_keys.t(), out=logits[: block.shape[0]])
    return time.perf_counter() - start


def measure(model, length: int, dtype: torch.dtype, repeats: int) -> dict:
    embeds = torch.randn(1, length, 3584, generator=torch.Generator().manual_seed(length)).to(dtype)
    plain_prefill(model, embeds)  # warm-up: allocator, thread pool
    timers = {name: ScoringTimer(make()) for name, make in PRESSES.items()}
    first = {name: timer.prefill(model, embeds) for name, timer in timers.items()}
    plain, floor, scoring = [], [], {name: [] for name in PRESSES}
    for _ in range(repeats):
        plain.append(plain_prefill(model, embeds))
        for name, timer in timers.items():
            scoring[name].append(timer.prefill(model, embeds))
        floor.append(logits_floor(length, timers["shiftkv"].press.n_proxies))
    prefill_s = statistics.median(plain)
    entry = {"prompt_tokens": length, "repeats": repeats, "prefill_s": round(prefill_s, 4)}
    entry["first_scoring_s"] = round(first["shiftkv"], 4)
    # ShiftKV is the subject: its figures keep the plain names, SnapKV's are prefixed.
    for name, times in scoring.items():
        prefix = "" if name == "shiftkv" else f"{name}_"
        entry[f"{prefix}scoring_s"] = round(statistics.median(times), 4)
        entry[f"{prefix}scoring_over_prefill"] = round(statistics.median(times) / prefill_s, 5)
    entry["shiftkv_over_snapkv"] = round(entry["scoring_s"] / entry["snapkv_scoring_s"], 3)
    entry["logits_floor_s"] = round(statistics.median(floor), 4)
    entry["logits_floor_over_prefill"] = round(statistics.median(floor) / prefill_s, 5)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args()

    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = qwen25vl_7b_layer(args.layers, dtype)
        for length in (int(n) for n in args.lengths.split(",")):
            results.append({"dtype": dtype_name, **measure(model, length, dtype, args.repeats)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        del model
    print(
        json.dumps(
            {
                "benchmark": "scoring overhead: ShiftKV vs SnapKV, share of one prefill",
                "model": f"{args.layers} Qwen2.5-VL-7B text layer(s), cpu, random weights, sdpa",
                "budget": BUDGET,
                "torch_threads": torch.get_num_threads(),
                "backend": ops.available(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
