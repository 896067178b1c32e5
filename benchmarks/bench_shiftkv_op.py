"""Compiled ShiftKV scoring op vs its torch reference: time and peak extra memory, printed as JSON.

    python benchmarks/bench_shiftkv_op.py [--device cpu|cuda] [--lengths 1024 4096 16384] [--repeats 3]

Inputs have Qwen2.5-VL-7B dimensions (28 query heads, 4 KV heads, head_dim 128), N = 512 proxies in
G = 32 groups, batch 1, bfloat16, tau = 0.95.

Time: median wall time over ``repeats`` calls on the same inputs; op and reference calls alternate
in one process, so machine load hits both alike.

Peak extra memory (bytes allocated during the call beyond its inputs, output included):
* CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus the memory allocated before it.
* CPU: tracemalloc cannot see torch's allocations, so each (backend, seq_len) runs once in a fresh
  subprocess with glibc's mmap threshold at 64 KiB (blocks above it are mmapped and returned to the
  OS when freed, so the resident set follows live allocations); the figure is the peak resident set
  size during the call (VmHWM, reset through /proc/self/clear_refs) minus the resident size before
  it, after one warm-up call. It includes thread stacks and allocator slack, so it is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from mmshiftkv.ops import available, shiftkv_scores

Q_HEADS, KV_HEADS, HEAD_DIM, N_PROXIES, N_GROUPS = 28, 4, 128, 512, 32
OPTIONS = {"n_groups": N_GROUPS, "tau": 0.95, "scaling": HEAD_DIM**-0.5}
BACKENDS = {"op": "compiled", "torch": "torch"}


def make_inputs(seq_len: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seq_len)
    proxies = torch.randn(1, Q_HEADS, N_PROXIES, HEAD_DIM, generator=generator) * 10.0
    keys = torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=generator)
    last_query = torch.randn(1, Q_HEADS, HEAD_DIM, generator=generator)
    return tuple(t.to(device=device, dtype=torch.bfloat16) for t in (proxies, keys, last_query))


def run(backend: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return shiftkv_scores(*inputs, backend=BACKENDS[backend], **OPTIONS)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_times(inputs: tuple[torch.Tensor, ...], device: str, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in BACKENDS}
    for name in BACKENDS:  # warm-up: thread pools, CUDA context, allocator
        run(name, inputs)
    for _ in range(repeats):
        for name in BACKENDS:
            synchronize(device)
            start = time.perf_counter()
            run(name, inputs)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) * 1024


def measure_cpu_memory(backend: str, seq_len: int) -> int:
    """Runs in the subprocess: peak resident bytes added by one call."""
    inputs = make_inputs(seq_len, "cpu")
    run(backend, inputs)
    before = _resident_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    run(backend, inputs)
    return _resident_bytes("VmHWM") - before


def peak_extra_memory(backend: str, seq_len: int, device: str) -> int:
    if device == "cuda":
        inputs = make_inputs(seq_len, device)
        run(backend, inputs)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(backend, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    command = [sys.executable, __file__, "--measure-cpu-memory", backend, str(seq_len)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def op_working_set(seq_len: int) -> dict[str, int]:
    """The CPU op's extra memory by design (shiftkv_cpu.cpp), in bytes."""
    threads = torch.get_num_threads()
    block_rows = min(Q_HEADS // KV_HEADS * N_PROXIES // N_GROUPS, max(8, (1 << 20) // seq_len))
    return {
        "per_kv_head_masses_and_votes": KV_HEADS * ((N_GROUPS + 1) * 8 + N_GROUPS) * seq_len,
        "one_head_float64_keys_and_proxies": seq_len * HEAD_DIM * 8
        + Q_HEADS // KV_HEADS * N_PROXIES * HEAD_DIM * 8,
        "per_thread_logit_blocks": threads * block_rows * seq_len * 8,
        "output": KV_HEADS * seq_len * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--measure-cpu-memory", nargs=2, metavar=("BACKEND", "SEQ_LEN"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.measure_cpu_memory:
        print(measure_cpu_memory(args.measure_cpu_memory[0], int(args.measure_cpu_memory[1])))
        return
    if not available()[args.device]:
        raise SystemExit(f"the compiled op is not available on {args.device}: build it first")

    results = []
    for seq_len in args.lengths:
        inputs = make_inputs(seq_len, args.device)
        times = median_times(inputs, args.device, args.repeats)
        op_scores, torch_scores = run("op", inputs), run("torch", inputs)
        entry = {
            "seq_len": seq_len,
            "op_median_s": round(times["op"], 4),
            "torch_median_s": round(times["torch"], 4),
            "speedup": round(times["torch"] / times["op"], 2),
            "op_peak_extra_bytes": peak_extra_memory("op", seq_len, args.device),
            "torch_peak_extra_bytes": peak_extra_memory("torch", seq_len, args.device),
            "scores_equal": bool(torch.equal(op_scores, torch_scores)),
        }
        entry["op_extra_bytes_per_kv_head_per_token"] = round(
            entry["op_peak_extra_bytes"] / KV_HEADS / seq_len, 1
        )
        if args.device == "cpu":
            entry["op_working_set_bytes"] = op_working_set(seq_len)
        results.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)

    report = {
        "benchmark": "shiftkv_scores: compiled op vs torch reference",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "shape": {
            "batch": 1,
            "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "n_proxies": N_PROXIES,
            "n_groups": N_GROUPS,
            "dtype": "bfloat16",
        },
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
