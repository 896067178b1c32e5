"""LOOK-M's scoring and merging time as a fraction of the prefill forward they ride on.

One decoder layer with Qwen2.5-VL-7B's text dimensions (see ``bench_shiftkv_overhead.py``; random
weights, on the CPU) prefills T tokens under ``LookMPress(budget=64)``: its score (the accumulated
attention of all T prompt queries, recomputed in query blocks of at most 2^24 probabilities) and its
merge (cosine similarity of every evicted key to the 64 kept keys per KV head, pivot merge) are timed
inside the prefill and reported, medians over the repeats, with their ratios to the median plain
prefill measured in the same run. The score repeats the QK^T and softmax part of the layer's
attention for every query, so its share grows with T; the merge is O(T x budget).

    python benchmarks/bench_lookm.py --lengths 1024,4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from bench_shiftkv_overhead import Clock, plain_prefill, qwen25vl_7b_layer
from transformers import DynamicCache

from mmshiftkv import LookMPress
from mmshiftkv.cache import cache_argument

BUDGET = 64


class StepTimer:
    """Adds up the seconds a press spends in its ``score`` and its ``merge``."""

    def __init__(self, press: LookMPress) -> None:
        self.press = press
        self.seconds = {"score": 0.0, "merge": 0.0}
        for step in self.seconds:
            setattr(press, step, self._timed(step, getattr(press, step)))

    def _timed(self, step: str, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            self.seconds[step] += time.perf_counter() - start
            return result

        return timed

    def prefill(self, model, embeds: torch.Tensor) -> dict[str, float]:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        with torch.no_grad(), self.press(model):
            model.model(inputs_embeds=embeds, **cache_argument(model.model, DynamicCache()))
        return dict(self.seconds)


#: Wall-clock seconds, as the overhead benchmark times its CPU runs.
CLOCK = Clock("cpu")


def measure(model, length: int, repeats: int) -> dict:
    embeds = torch.randn(1, length, 3584, generator=torch.Generator().manual_seed(length))
    plain_prefill(model, embeds, CLOCK)  # warm-up: allocator, thread pool
    timer = StepTimer(LookMPress(budget=BUDGET))
    plain, steps = [], {"score": [], "merge": []}
    for _ in range(repeats):
        plain.append(plain_prefill(model, embeds, CLOCK))
        for step, seconds in timer.prefill(model, embeds).items():
            steps[step].append(seconds)
    prefill_s = statistics.median(plain)
    entry = {"prompt_tokens": length, "repeats": repeats, "prefill_s": round(prefill_s, 4)}
    for step, times in steps.items():
        entry[f"{step}_s"] = round(statistics.median(times), 4)
        entry[f"{step}_over_prefill"] = round(statistics.median(times) / prefill_s, 4)
    entry["kept_per_head"] = int(timer.press.stats.kept.max())
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = qwen25vl_7b_layer(torch.float32, "cpu")
    results = [measure(model, int(length), args.repeats) for length in args.lengths.split(",")]
    report = {
        "benchmark": "lookm_overhead",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "python": sys.version.split()[0],
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
