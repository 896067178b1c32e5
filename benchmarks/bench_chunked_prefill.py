"""Chunked prefill under a press: peak memory and prefill time vs chunk size, KV kept unchanged.

Two decoder layers with Qwen2.5-VL-7B's text dimensions (hidden 3584, 28 query heads, 4 KV heads,
head_dim 128, MLP 18944; random weights, float32, sdpa, on the CPU) prefill a T-token prompt of
random embeddings, in one forward or in chunks of C tokens (forwards of consecutive slices over one
cache, after ``press.expect_prompt(T)``), under each press (ShiftKV budget 64, SnapKV budget 64
window 32) and without one. Each (T, C, press) runs in its own process, so that its peak memory is
its own: ``peak_extra_mb`` is the process's peak resident memory minus its resident memory once the
model and the prompt are built and a 128-token warm-up prefill ran. ``state_bytes`` is what
the press keeps across chunks (:attr:`mmshiftkv.presses.chunked.ChunkedPrefill.nbytes` at the last
chunk: trailing attention-input rows, running statistics, positions); ``kv_bytes_after`` the KV
bytes after compression and ``kept_equal`` whether every layer and KV head kept the same tokens as
the one-forward prefill of the same press (both must not depend on C).

    python benchmarks/bench_chunked_prefill.py --lengths 8192,16384 --chunks 0,512,2048 --repeats 2
    (chunk 0: one forward)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_layer_budgets import two_layer_model  # the script's directory is on sys.path
from transformers import DynamicCache

from mmshiftkv.cache import cache_argument
from mmshiftkv.presses import BudgetedPress
from mmshiftkv.presses.chunked import ChunkedPrefill
from mmshiftkv.registry import make_press

BUDGET = 64
#: Tokens of the untimed prefill each process runs first (its peak is far below the measured ones').
WARM_UP_TOKENS = 128
PRESS_NAMES = ("none", "shiftkv", "snapkv")


def press_named(name: str) -> BudgetedPress | None:
    return None if name == "none" else make_press(name, budget=BUDGET)


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def prefill(model, embeds: torch.Tensor, press, chunk: int) -> tuple[float, DynamicCache, int]:
    """Seconds of one prefill (one forward when ``chunk`` is 0), its cache, the press's state bytes."""
    length = embeds.shape[1]
    chunk = chunk or length
    held = [0]
    add_layer = ChunkedPrefill.add_layer

    def measured(self, *args, **kwargs):
        add_layer(self, *args, **kwargs)
        held[0] = max(held[0], self.nbytes)

    ChunkedPrefill.add_layer = measured
    cache = DynamicCache()
    try:
        with torch.no_grad():
            start = time.perf_counter()
            if press is None:
                for begin in range(0, length, chunk):
                    model.model(
                        inputs_embeds=embeds[:, begin : begin + chunk], **cache_argument(model.model, cache)
                    )
            else:
                with press(model):
                    if chunk < length:
                        press.expect_prompt(length)
                    for begin in range(0, length, chunk):
                        model.model(
                            inputs_embeds=embeds[:, begin : begin + chunk],
                            **cache_argument(model.model, cache),
                        )
            seconds = time.perf_counter() - start
    finally:
        ChunkedPrefill.add_layer = add_layer
    return seconds, cache, held[0]


def child(length: int, chunk: int, press_name: str, repeats: int) -> dict:
    model = two_layer_model(torch.float32)
    embeds = torch.randn(1, length, 3584, generator=torch.Generator().manual_seed(length))
    prefill(model, embeds[:, :WARM_UP_TOKENS], press_named(press_name), 0)  # thread pool, first touches
    baseline = resident_mb()
    times, digest, state, kv_bytes = [], "", 0, 0
    for _ in range(repeats):
        press = press_named(press_name)
        seconds, cache, state = prefill(model, embeds, press, chunk)
        times.append(seconds)
        if press is not None:
            kv_bytes = press.stats.bytes_after
            hashed = hashlib.sha256()
            for indices in press.stats.indices:
                hashed.update(b"-" if indices is None else indices.numpy().tobytes())
            digest = hashed.hexdigest()[:16]
        else:
            kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        del cache
    return {
        "prompt_tokens": length,
        "chunk": chunk or length,
        "press": press_name,
        "repeats": repeats,
        "prefill_s": round(statistics.median(times), 3),
        "peak_extra_mb": round(peak_mb() - baseline, 1),
        "state_bytes": state,
        "kv_bytes_after": kv_bytes,
        "kept_digest": digest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--chunks", default="0,512,2048", help="comma-separated chunk sizes; 0: one forward")
    parser.add_argument("--presses", default=",".join(PRESS_NAMES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        length, chunk, name = args.child.split(":")
        print(json.dumps(child(int(length), int(chunk), name, args.repeats)))
        return

    results = []
    for length in (int(n) for n in args.lengths.split(",")):
        for name in args.presses.split(","):
            one_forward = None
            for chunk in (int(c) for c in args.chunks.split(",")):
                command = [sys.executable, __file__, "--child", f"{length}:{chunk}:{name}"]
                command += ["--repeats", str(args.repeats)]
                entry = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                if chunk == 0:
                    one_forward = entry
                if one_forward is not None:
                    entry["time_over_one_forward"] = round(entry["prefill_s"] / one_forward["prefill_s"], 3)
                    entry["kv_bytes_equal"] = entry["kv_bytes_after"] == one_forward["kv_bytes_after"]
                    entry["kept_equal"] = entry["kept_digest"] == one_forward["kept_digest"]
                results.append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)
    report = {
        "benchmark": "chunked prefill under a press: peak memory and time vs chunk size",
        "model": "2 Qwen2.5-VL-7B text layers, cpu, float32, random weights, sdpa",
        "budget": BUDGET,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
