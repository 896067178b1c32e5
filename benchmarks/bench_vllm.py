"""Throughput, latency and KV blocks of a vLLM engine with and without a press, at the same KV memory.

Engines on the same tiny model (:func:`mmshiftkv.testing.vllm_models.save_servable_tiny_model`)
serve the same workload: ``--requests`` prompts of ``--prompt-len`` random tokens, ``--max-tokens``
greedy tokens each (end-of-sequence ignored), submitted at once. One engine serves them as they
are, the other with the press at ``--budget`` tokens per KV head, which frees each prompt's
emptied blocks right after its prefill.

Each ``--blocks`` value is one KV pool (blocks of ``--block-size`` tokens; ``0`` sizes the pool
to hold every request uncompressed, so memory never limits): a pool that limits shows what the
press buys (more requests decode at once), a pool that does not shows what it costs (the
scoring and the plugin's bookkeeping, with nothing to gain). For each pool the two engines run
``--repeats`` times, alternating (baseline, press, baseline, press, ...), each on a fresh engine
after a warm-up batch, so that a drift of the machine's load hits both alike.

Per run: wall time, requests/s, generated tokens/s, median time to first token and median
inter-token latency over the requests (vLLM's per-request metrics), preemptions, and the peak KV
blocks in use and requests running at once (read by :class:`mmshiftkv.vllm.scheduler.BlockLedger`).
Per pool: each metric's median, min and max over the repeats, and the press / baseline ratio of
every repeat (paired runs) with its median, min and max. Printed as JSON, and written to
``--output`` (results live under ``benchmarks/results/``). Absolute times on a CPU are noisy and
the tiny model makes per-step overhead, not attention, dominate; the ratios are the result.

Usage (in the vLLM venv, see ``scripts/setup_vllm_venv.sh``)::

    .venv-vllm/bin/python benchmarks/bench_vllm.py --press shiftkv --budget 32 --requests 48 \\
        --blocks 64 0 --repeats 5 --output benchmarks/results/vllm_shiftkv.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

METRICS = (
    "wall_s",
    "requests_per_s",
    "generated_tokens_per_s",
    "ttft_ms",
    "itl_ms",
    "preemptions",
    "peak_kv_blocks",
    "peak_running_requests",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--press", default="shiftkv")
    parser.add_argument("--budget", type=int, default=32, help="prompt tokens kept per KV head")
    parser.add_argument("--family", default="qwen2", help="tiny servable model family")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--blocks", type=int, nargs="+", default=[64, 0], help="KV pools to compare (0: one never limiting)"
    )
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per engine and pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the JSON report here too")
    args = parser.parse_args(argv)
    if args.prompt_len <= args.budget:
        parser.error("--prompt-len must exceed --budget (shorter prompts are not compressed)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    needed = blocks_per_request(args)
    for blocks in args.blocks:
        if blocks != 0 and blocks < needed:
            parser.error(f"--blocks must hold one whole request: at least {needed} (or 0)")
    return args


def blocks_per_request(args: argparse.Namespace) -> int:
    """Blocks one uncompressed request holds at its end."""
    return -(-(args.prompt_len + args.max_tokens) // args.block_size)


def run_engine(args: argparse.Namespace, folder: str, pool: int, press: str | None) -> dict:
    """Serve the workload once on a fresh engine; its metrics."""
    from vllm import LLM, SamplingParams

    from mmshiftkv.vllm.scheduler import BlockLedger

    max_len = args.prompt_len + args.max_tokens
    options = dict(
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        block_size=args.block_size,
        num_gpu_blocks_override=pool + 1,  # + vLLM's null block
        max_model_len=max_len,
        max_num_batched_tokens=max(max_len, 2 * args.prompt_len),
        max_num_seqs=args.requests,
        seed=args.seed,
        disable_log_stats=False,  # per-request metrics (time to first token, token times, preemptions)
    )
    if press is not None:
        options["additional_config"] = {"mmshiftkv": {"press": press, "budget": args.budget}}
    llm = LLM(folder, **options)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [
        {"prompt_token_ids": torch.randint(5, 250, (args.prompt_len,), generator=generator).tolist()}
        for _ in range(args.requests)
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    # Peaks of the measured batch only; the baseline engine gets a ledger that only observes.
    if press is None:
        scheduler.mmshiftkv_ledger = BlockLedger(scheduler, None)
    ledger = scheduler.mmshiftkv_ledger
    ledger.peak_blocks = ledger.peak_running = 0
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = [o.metrics.first_token_latency for o in outputs]
    itl = [
        (o.metrics.last_token_ts - o.metrics.first_token_ts) / (o.metrics.num_generation_tokens - 1)
        for o in outputs
        if o.metrics.num_generation_tokens > 1
    ]
    result = {
        "wall_s": round(wall, 4),
        "requests_per_s": round(args.requests / wall, 3),
        "generated_tokens_per_s": round(generated / wall, 2),
        "ttft_ms": round(1000 * statistics.median(ttft), 2),
        "itl_ms": round(1000 * statistics.median(itl), 3) if itl else None,
        "preemptions": sum(o.metrics.num_preemptions for o in outputs),
        "peak_kv_blocks": ledger.peak_blocks,
        "peak_running_requests": ledger.peak_running,
        "generated_tokens": generated,
        "pool_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1,
    }
    del llm, scheduler, ledger
    gc.collect()
    return result


def spread(values: list[float]) -> dict:
    """Median, min and max of one metric over the repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per engine each metric's spread; per metric the paired press / baseline ratios' spread."""
    summary: dict = {engine: {} for engine in runs}
    ratios = {}
    for metric in METRICS:
        for engine, engine_runs in runs.items():
            values = [run[metric] for run in engine_runs if run[metric] is not None]
            summary[engine][metric] = spread(values) if values else None
        paired = [
            p[metric] / b[metric]
            for b, p in zip(runs["baseline"], runs["press"])
            if b[metric] and p[metric] is not None
        ]
        ratios[metric] = {key: round(value, 3) for key, value in spread(paired).items()} if paired else None
    summary["ratio"] = ratios
    return summary


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # In-process engine core (the ledger is read in place); on CPU a 1 GiB KV space (the pool is
    # fixed by --blocks anyway); nothing is downloaded.
    for name, value in (
        ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
        ("VLLM_CPU_KVCACHE_SPACE", "1"),
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
    ):
        os.environ.setdefault(name, value)
    import vllm

    from mmshiftkv.testing.vllm_models import save_servable_tiny_model

    load_before = load_average()
    pools = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(save_servable_tiny_model(args.family, os.path.join(tmp, args.family), seed=args.seed))
        for blocks in args.blocks:
            pool = blocks or args.requests * blocks_per_request(args)
            runs: dict[str, list[dict]] = {"baseline": [], "press": []}
            for _ in range(args.repeats):
                runs["baseline"].append(run_engine(args, folder, pool, None))
                runs["press"].append(run_engine(args, folder, pool, args.press))
            pools[f"{pool}_blocks" + ("_unlimited" if blocks == 0 else "")] = {
                "pool_blocks": pool,
                "limits": blocks != 0,
                "summary": summarize(runs),
                "runs": runs,
            }
    report = {
        "config": {
            "press": args.press,
            "budget": args.budget,
            "family": args.family,
            "requests": args.requests,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "block_size": args.block_size,
            "repeats": args.repeats,
        },
        "machine": {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(),
            "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "pools": pools,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
