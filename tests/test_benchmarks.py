"""The README's benchmark commands run, at toy sizes, and report quantities that can be checked by hand.

Timings are not checked (they belong to the benchmark runs); byte counts, ratios and accuracies are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Bytes of one prompt token's K and V in one Qwen2.5-VL-7B layer: 4 KV heads x 128 x (K, V).
KV_VALUES_PER_TOKEN = 4 * 128 * 2


def run_benchmark(script: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_op_benchmark_checks_the_op_against_the_reference() -> None:
    report = json.loads(run_benchmark("bench_shiftkv_op.py", "--lengths", "128", "--repeats", "1"))
    (result,) = report["results"]
    assert result["seq_len"] == 128 and result["votes_equal_fraction"] >= 0.999
    assert result["kept_sets_equal"] is True
    ratio = result["torch_median_s"] / result["op_median_s"]
    assert result["speedup"] == pytest.approx(ratio, rel=0.05, abs=0.01)


def test_overhead_benchmark_ratio_is_scoring_over_prefill() -> None:
    report = json.loads(run_benchmark("bench_shiftkv_overhead.py", "--lengths", "128", "--repeats", "1"))
    (result,) = report["results"]
    assert result["prompt_tokens"] == 128 and result["scoring_s"] > 0
    ratio = result["scoring_s"] / result["prefill_s"]
    assert result["scoring_over_prefill"] == pytest.approx(ratio, abs=1e-3)
    floor = result["logits_floor_s"] / result["prefill_s"]
    assert result["logits_floor_over_prefill"] == pytest.approx(floor, abs=1e-3)
    assert result["first_scoring_s"] > 0


def test_lookm_benchmark_times_score_and_merge_against_the_prefill() -> None:
    report = json.loads(run_benchmark("bench_lookm.py", "--lengths", "128", "--repeats", "1"))
    (result,) = report["results"]
    assert result["prompt_tokens"] == 128 and result["kept_per_head"] == 64
    for step in ("score", "merge"):
        seconds = result[f"{step}_s"]
        assert seconds > 0
        assert result[f"{step}_over_prefill"] == pytest.approx(seconds / result["prefill_s"], abs=1e-3)


def test_fingerprint_benchmark_times_the_check_against_the_prefill() -> None:
    report = json.loads(run_benchmark("bench_fingerprint.py", "--lengths", "64", "--repeats", "1"))
    (result,) = report["results"]
    assert result["dtype"] == "float32" and result["prompt_tokens"] == 64
    assert result["fingerprint_s"] > 0 and result["reprojection_s"] > 0
    ratio = result["fingerprint_s"] / result["prefill_s"]
    assert result["fingerprint_over_prefill"] == pytest.approx(ratio, rel=1e-3, abs=1e-6)


def test_headwise_benchmark_bytes_match_the_formula() -> None:
    args = ["--contexts", "256", "--budget", "16", "--layers", "1", "--steps", "1", "--repeats", "1"]
    report = json.loads(run_benchmark("bench_headwise_decode.py", *args))
    (result,) = report["results"]
    float32 = 4
    assert result["bytes"]["full"]["held"] == 256 * KV_VALUES_PER_TOKEN * float32
    assert result["bytes"]["uniform"]["held"] == 16 * KV_VALUES_PER_TOKEN * float32
    headwise = result["bytes"]["headwise"]
    assert headwise["ideal"] == 16 * KV_VALUES_PER_TOKEN * float32
    assert headwise["ideal"] <= headwise["held"] <= 1.05 * headwise["ideal"]


def test_decode_profile_benchmark_cache_bytes_match_the_formula() -> None:
    args = ["--layers", "1", "--lengths", "128", "--budget", "16", "--decode-tokens", "2"]
    lines = run_benchmark("bench_decode_profile.py", *args).splitlines()
    points = {point["press"]: point for point in map(json.loads, filter(lambda x: x.startswith("{"), lines))}
    assert set(points) == {"full", "shiftkv", "snapkv"}
    bfloat16 = 2
    # The cache ends holding the prompt (or the kept tokens) plus the first generated token.
    assert points["full"]["kv_cache_bytes"] == (128 + 1) * KV_VALUES_PER_TOKEN * bfloat16
    for press in ("shiftkv", "snapkv"):
        assert points[press]["kv_cache_bytes"] == (16 + 1) * KV_VALUES_PER_TOKEN * bfloat16


def test_grounding_benchmark_reports_every_run(tmp_path: Path) -> None:
    args = ["--samples", "8", "--budgets", "8", "--allocations", "uniform,sparsemm"]
    args += ["--calibration-samples", "2", "--analysis-samples", "1", "--no-plot", "--out", str(tmp_path)]
    run_benchmark("bench_grounding.py", *args)
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["full_kv"]["accuracy"] >= 7 / 8
    runs = {(row["allocation"], row["press"]) for row in report["rows"]}
    presses = {"shiftkv", "snapkv", "snapkv(window=8)", "streaming_llm", "keydiff", "expected_attention"}
    presses |= {"last_attn", "vlcache", "lookm", "mixkv", "mixkv(window=8)", "mixkv(base=shiftkv, window=8)"}
    variants = {name for _, name in runs if name.startswith("shiftkv(")}
    expected = {(allocation, press) for allocation in ("uniform", "sparsemm") for press in presses}
    assert runs == expected | {("uniform", variant) for variant in variants}
    assert len(variants) == 5
    assert report["fig1"]["coverage"]["full"]["mean"] == 1.0
    assert all(0 <= cov["mean"] <= 1 for cov in report["fig1"]["coverage"].values())
    assert (tmp_path / "head_scores.json").is_file() and (tmp_path / "table.md").is_file()


def test_grounding_benchmark_without_the_fig1_analysis(tmp_path: Path) -> None:
    args = ["--samples", "1", "--budgets", "8", "--allocations", "uniform", "--analysis-samples", "0"]
    run_benchmark("bench_grounding.py", *args, "--no-plot", "--out", str(tmp_path))
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["fig1"] is None and report["rows"]
    assert not list(tmp_path.glob("fig1*.png"))


def test_chunked_prefill_benchmark_keeps_the_same_tokens_and_counts_its_state() -> None:
    args = ["--lengths", "128", "--chunks", "0,50", "--presses", "shiftkv", "--repeats", "1"]
    report = json.loads(run_benchmark("bench_chunked_prefill.py", *args))
    one_forward, chunked = report["results"]
    assert (one_forward["chunk"], chunked["chunk"]) == (128, 50)
    assert chunked["kept_equal"] is True and chunked["kv_bytes_equal"] is True
    assert chunked["kv_bytes_after"] == 2 * 64 * KV_VALUES_PER_TOKEN * 4  # 2 layers, budget 64, float32
    # Across chunks ShiftKV keeps per layer 8 rows of the 3584-wide attention input (float32) and 3
    # float64 statistics, and the prompt's 128 int64 positions; a one-forward prefill keeps nothing.
    assert chunked["state_bytes"] == 2 * (8 * 3584 * 4 + 3 * 8) + 128 * 8
    assert one_forward["state_bytes"] == 0
