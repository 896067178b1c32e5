"""Compiled ShiftKV scoring op vs its torch reference: time and peak extra memory, printed as JSON.

    python benchmarks/bench_shiftkv_op.py [--device cpu|cuda] [--lengths 1024 4096 16384] [--repeats 3]
                                          [--dtypes bfloat16 float32]

Inputs have Qwen2.5-VL-7B dimensions (28 query heads, 4 KV heads, head_dim 128), N = 512 proxies in
G = 32 groups, batch 1, tau = 0.95, proxies spread 10x as ShiftKV's are.

Agreement (the op computes in float32, the reference in float64; see shiftkv_scores' "Numerics"):
the fraction of tokens whose vote count equals the reference's, whether the kept sets at budget 64
are identical, and where votes agree the largest score difference in float32 ulps.

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

from mmshiftkv.ops import available, group_attention_mass, shiftkv_scores, votes_from_mass
from mmshiftkv.ops.compiled import cpu_kernel
from mmshiftkv.presses.selection import select_kept_indices

Q_HEADS, KV_HEADS, HEAD_DIM, N_PROXIES, N_GROUPS = 28, 4, 128, 512, 32
OPTIONS = {"n_groups": N_GROUPS, "tau": 0.95, "scaling": HEAD_DIM**-0.5}
BACKENDS = {"op": "compiled", "torch": "torch"}


def make_inputs(
    seq_len: int, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seq_len)
    proxies = torch.randn(1, Q_HEADS, N_PROXIES, HEAD_DIM, generator=generator) * 10.0
    keys = torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=generator)
    last_query = torch.randn(1, Q_HEADS, HEAD_DIM, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (proxies, keys, last_query))


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


def measure_cpu_memory(backend: str, seq_len: int, dtype: torch.dtype) -> int:
    """Runs in the subprocess: peak resident bytes added by one call."""
    inputs = make_inputs(seq_len, "cpu", dtype)
    run(backend, inputs)
    before = _resident_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    run(backend, inputs)
    return _resident_bytes("VmHWM") - before


def peak_extra_memory(backend: str, seq_len: int, device: str, dtype: torch.dtype) -> int:
    if device == "cuda":
        inputs = make_inputs(seq_len, device, dtype)
        run(backend, inputs)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(backend, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    command = [sys.executable, __file__, "--measure-cpu-memory", backend, str(seq_len), str(dtype)[6:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def agreement(op_scores: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> dict:
    """How the op's scores compare with the float64 reference's votes and anchor."""
    mass, anchor = group_attention_mass(*inputs, n_groups=N_GROUPS, scaling=OPTIONS["scaling"])
    votes = votes_from_mass(mass, OPTIONS["tau"]).sum(dim=2).double().cpu()
    reference = (votes + anchor.cpu()).float()
    op = op_scores.cpu()
    same = torch.round(op.double() - anchor.cpu()) == votes
    # Both scores are float32 (votes + anchor): count their difference in float32 ulps of the reference.
    ulp = torch.nextafter(reference, torch.tensor(float("inf"))) - reference
    ulps = ((op - reference).abs() / ulp)[same]
    return {
        "votes_equal_fraction": round(float(same.double().mean()), 6),
        "kept_sets_equal": bool(
            torch.equal(select_kept_indices(op, 64)[0], select_kept_indices(reference, 64)[0])
        ),
        "score_max_diff_ulps": float(ulps.max()) if ulps.numel() else 0.0,
    }


def op_working_set(seq_len: int, dtype: torch.dtype) -> dict[str, int]:
    """The CPU op's extra memory by design (shiftkv_cpu.cpp), in bytes.

    Keys are padded to the kernel's panel (64 keys on AVX-512, 16 on AVX2 and DEFAULT); a row block
    holds about 2^17 float32 logits (``block_rows`` there).
    """
    threads = torch.get_num_threads()
    kernel = cpu_kernel(dtype)
    lanes = 16 if kernel.startswith("avx512") else 8
    panel = 64 if kernel.startswith("avx512") else 16
    micro_rows = 4 if kernel == "default" else 6
    padded = -(-seq_len // panel) * panel
    block_rows = min(192, max(micro_rows, (1 << 17) // padded // micro_rows * micro_rows))
    gemm_bytes = 2 if kernel.endswith("_bf16") else 4
    float32 = 4
    return {
        "per_kv_head_sums_and_votes": KV_HEADS * ((N_GROUPS + 1) * padded * float32 + N_GROUPS * seq_len),
        "one_head_packed_keys": padded * HEAD_DIM * gemm_bytes,
        "one_head_query_rows": Q_HEADS // KV_HEADS * (N_PROXIES + 1) * HEAD_DIM * gemm_bytes,
        "per_thread_logit_blocks": threads * block_rows * (padded + lanes + 1) * float32,
        "output": KV_HEADS * seq_len * float32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="e.g. bfloat16 float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--measure-cpu-memory", nargs=3, metavar=("BACKEND", "SEQ_LEN", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.measure_cpu_memory:
        backend, seq_len, dtype = args.measure_cpu_memory
        print(measure_cpu_memory(backend, int(seq_len), getattr(torch, dtype)))
        return
    if not available()[args.device]:
        raise SystemExit(f"the compiled op is not available on {args.device}: build it first")

    results = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for seq_len in args.lengths:
            inputs = make_inputs(seq_len, args.device, dtype)
            times = median_times(inputs, args.device, args.repeats)
            entry = {
                "dtype": dtype_name,
                "seq_len": seq_len,
                "op_median_s": round(times["op"], 4),
                "torch_median_s": round(times["torch"], 4),
                "speedup": round(times["torch"] / times["op"], 2),
                "op_peak_extra_bytes": peak_extra_memory("op", seq_len, args.device, dtype),
                "torch_peak_extra_bytes": peak_extra_memory("torch", seq_len, args.device, dtype),
                **agreement(run("op", inputs), inputs),
            }
            entry["op_extra_bytes_per_kv_head_per_token"] = round(
                entry["op_peak_extra_bytes"] / KV_HEADS / seq_len, 1
            )
            if args.device == "cpu":
                entry["op_working_set_bytes"] = op_working_set(seq_len, dtype)
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)

    report = {
        "benchmark": "shiftkv_scores: compiled op vs torch reference",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "op_cpu_kernel": {name: cpu_kernel(getattr(torch, name)) for name in args.dtypes},
        "shape": {
            "batch": 1,
            "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "n_proxies": N_PROXIES,
            "n_groups": N_GROUPS,
        },
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
