"""Requests/s and KV blocks of a vLLM engine with and without a press, at the same fixed KV memory.

Two engines on the same tiny model (:func:`mmshiftkv.testing.vllm_models.save_servable_tiny_model`) get the
same KV pool (``--blocks`` blocks of ``--block-size`` tokens) and the same workload: ``--requests``
prompts of ``--prompt-len`` random tokens, ``--max-tokens`` greedy tokens each, submitted at once.
One engine serves them as they are, the other with the press at ``--budget`` tokens per KV head,
which frees each prompt's emptied blocks right after its prefill, so more requests decode at once
in the same memory. Both engines run in this process one after the other (a warm-up batch first),
so their ratio is measured side by side.

Prints one JSON object: per engine the wall time, requests/s, generated tokens/s, the peak KV
blocks in use and the peak number of running requests (from vLLM's scheduler and KV manager, read
by :class:`mmshiftkv.vllm.scheduler.BlockLedger`), and the press / baseline ratios. Absolute
times on a CPU are noisy; the tiny model makes the step overhead, not the attention, dominate.

Usage (in the vLLM venv, see ``scripts/setup_vllm_venv.sh``)::

    .venv-vllm/bin/python benchmarks/bench_vllm.py --press shiftkv --budget 32 --requests 48
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch


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
    parser.add_argument("--blocks", type=int, default=64, help="KV blocks in the pool of each engine")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prompt_len <= args.budget:
        parser.error("--prompt-len must exceed --budget (shorter prompts are not compressed)")
    needed = -(-(args.prompt_len + args.max_tokens) // args.block_size)
    if args.blocks < needed:
        parser.error(f"--blocks must hold one whole request: at least {needed}")
    return args


def run_engine(args: argparse.Namespace, folder: str, press: str | None) -> dict:
    """Serve the workload on one engine; wall time and the scheduler's block records."""
    from vllm import LLM, SamplingParams

    from mmshiftkv.vllm.scheduler import BlockLedger

    max_len = args.prompt_len + args.max_tokens
    options = dict(
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        block_size=args.block_size,
        num_gpu_blocks_override=args.blocks + 1,  # + vLLM's null block
        max_model_len=max_len,
        max_num_batched_tokens=max(max_len, 2 * args.prompt_len),
        max_num_seqs=args.requests,
        seed=args.seed,
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
    # A fresh ledger for the measured batch; the baseline engine gets one that only records.
    scheduler.mmshiftkv_ledger = BlockLedger(scheduler, args.budget if press is not None else None)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    ledger = scheduler.mmshiftkv_ledger
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "wall_s": round(wall, 4),
        "requests_per_s": round(args.requests / wall, 3),
        "generated_tokens_per_s": round(generated / wall, 2),
        "generated_tokens": generated,
        "peak_kv_blocks": ledger.peak_blocks,
        "peak_running_requests": ledger.peak_running,
        "pool_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1,
    }
    del llm, scheduler
    gc.collect()
    return result


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
    from mmshiftkv.testing.vllm_models import save_servable_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(save_servable_tiny_model(args.family, os.path.join(tmp, args.family), seed=args.seed))
        baseline = run_engine(args, folder, None)
        pressed = run_engine(args, folder, args.press)
    report = {
        "config": {
            "press": args.press,
            "budget": args.budget,
            "family": args.family,
            "requests": args.requests,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "pool_blocks": args.blocks,
            "block_size": args.block_size,
            "device": args.device,
        },
        "baseline": baseline,
        "press": pressed,
        "ratio": {
            "requests_per_s": round(pressed["requests_per_s"] / baseline["requests_per_s"], 3),
            "peak_running_requests": round(
                pressed["peak_running_requests"] / baseline["peak_running_requests"], 3
            ),
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
