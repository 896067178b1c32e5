"""benchmarks/bench_vllm.py at toy sizes: under a press a request holds fewer blocks; more run at once."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("vllm")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vllm.py"


def test_more_requests_run_at_once_in_the_same_pool(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_vllm", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    prompt_len, max_tokens, budget, block_size, pool = 96, 8, 16, 32, 16
    output = tmp_path / "bench.json"
    report = bench.main(
        [
            *("--requests", "8", "--prompt-len", str(prompt_len), "--max-tokens", str(max_tokens)),
            *("--budget", str(budget), "--blocks", str(pool), "--block-size", str(block_size)),
            *("--press", "snapkv", "--repeats", "1", "--output", str(output)),
        ]
    )
    assert json.loads(output.read_text()) == report
    (result,) = report["pools"].values()
    assert result["limits"] and result["pool_blocks"] == pool
    (baseline,), (pressed,) = result["runs"]["baseline"], result["runs"]["press"]
    for run in (baseline, pressed):
        assert run["pool_blocks"] == pool
        assert run["generated_tokens"] == 8 * max_tokens
        assert run["peak_kv_blocks"] <= pool
        assert run["ttft_ms"] > 0 and run["itl_ms"] > 0 and run["preemptions"] >= 0
    # Without a press a request holds ceil((96 + 8) / 32) = 4 blocks: at most 4 fit in 16 blocks.
    full_request = math.ceil((prompt_len + max_tokens) / block_size)
    assert baseline["peak_running_requests"] <= pool // full_request
    # With it, 1 block after prefill (16 + 8 tokens); admitting one more needs its 3 prompt blocks.
    assert pressed["peak_running_requests"] > baseline["peak_running_requests"]
    ratio = result["summary"]["ratio"]["peak_running_requests"]
    assert ratio["median"] == pressed["peak_running_requests"] / baseline["peak_running_requests"]
