"""benchmarks/bench_vllm.py at toy sizes: under a press a request holds fewer blocks; more run at once."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("vllm")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vllm.py"


def test_more_requests_run_at_once_in_the_same_pool():
    spec = importlib.util.spec_from_file_location("bench_vllm", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    prompt_len, max_tokens, budget, block_size, pool = 96, 8, 16, 32, 16
    report = bench.main(
        [
            *("--requests", "8", "--prompt-len", str(prompt_len), "--max-tokens", str(max_tokens)),
            *("--budget", str(budget), "--blocks", str(pool), "--block-size", str(block_size)),
            *("--press", "snapkv"),
        ]
    )
    baseline, pressed = report["baseline"], report["press"]
    for result in (baseline, pressed):
        assert result["pool_blocks"] == pool
        assert result["generated_tokens"] == 8 * max_tokens
        assert result["peak_kv_blocks"] <= pool
    # Without a press a request holds ceil((96 + 8) / 32) = 4 blocks: at most 4 fit in 16 blocks.
    full_request = math.ceil((prompt_len + max_tokens) / block_size)
    assert baseline["peak_running_requests"] <= pool // full_request
    # With it, 1 block after prefill (16 + 8 tokens); admitting one more needs its 3 prompt blocks.
    assert pressed["peak_running_requests"] > baseline["peak_running_requests"]
    assert report["ratio"]["peak_running_requests"] > 1
