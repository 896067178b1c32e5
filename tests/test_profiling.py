"""Fig. 3 profiler: the model's real dimensions, the memory counter, KV bytes and the command line.

Runs one decoder layer of Qwen2.5-VL-7B's text dimensions at tiny input lengths (seconds on a
CPU). Expected KV-cache sizes are worked out by hand from the dimensions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmshiftkv.cli import main as mmshiftkv_main
from mmshiftkv.evaluation.profiling import PeakMemory, build_profile_model, run_profile

HIDDEN, KV_HEADS, HEAD_DIM, MLP = 3584, 4, 128, 18944


@pytest.fixture(scope="module")
def model():
    return build_profile_model(num_layers=1)


def test_profile_model_has_qwen25_vl_7b_text_dimensions(model) -> None:
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        HIDDEN,
        28,
        KV_HEADS,
    )
    assert config.hidden_size // config.num_attention_heads == HEAD_DIM
    assert config.intermediate_size == MLP and config.num_hidden_layers == 1
    # per layer: q (+bias), k and v (+bias, 512 = 4 KV heads x 128), o, gate/up/down, two norms
    kv = KV_HEADS * HEAD_DIM
    expected = (
        (HIDDEN * HIDDEN + HIDDEN) + 2 * (HIDDEN * kv + kv) + HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN
    )
    layer = model.model.layers[0]
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert model.dtype == torch.bfloat16
    weight = layer.mlp.up_proj.weight.float()
    assert torch.isfinite(weight).all() and abs(float(weight.std()) - 0.02) < 0.002
    assert float(layer.self_attn.q_proj.bias.abs().max()) == 0.0
    assert float(layer.input_layernorm.weight.min()) == 1.0


def test_peak_memory_sees_an_allocation_and_resets() -> None:
    memory = PeakMemory(torch.device("cpu"))
    if memory.peak() is None:
        pytest.skip(memory.method)
    mib = 2**20
    memory.start()
    block = torch.ones(32 * mib, dtype=torch.float32)  # 128 MiB, touched
    first = memory.peak() - memory.baseline
    del block
    memory.start()
    small = torch.ones(mib // 4, dtype=torch.float32)  # 1 MiB
    second = memory.peak() - memory.baseline
    del small
    assert 128 * mib <= first < 144 * mib
    assert second < 16 * mib


def test_profile_points_hold_the_expected_kv_cache(model) -> None:
    budget, decode = 16, 3
    points = run_profile(model, ["streaming_llm", "snapkv"], [48, 96], budget=budget, decode_tokens=decode)
    assert [(p.input_length, p.press) for p in points] == [
        (n, press) for n in (48, 96) for press in ("full", "streaming_llm", "snapkv")
    ]
    # K and V of 1 layer x 4 KV heads x 128 dims in bf16; the cache ends with the prompt (or the
    # kept budget) plus the decode_tokens - 1 tokens fed back during decoding
    per_token = 2 * KV_HEADS * HEAD_DIM * 2
    for point in points:
        kept = point.input_length if point.press == "full" else budget
        assert point.kv_cache_bytes == per_token * (kept + decode - 1)
        assert point.budget == (None if point.press == "full" else budget)
        assert point.prefill_s > 0 and point.decode_ms_per_token > 0 and point.decode_ms_per_token_mean > 0
        assert point.peak_memory_delta_bytes is None or point.peak_memory_delta_bytes > 0
    full = points[3]
    if full.peak_memory_delta_bytes is not None:
        assert full.peak_memory_bytes >= full.peak_memory_delta_bytes >= full.kv_cache_bytes


def test_profile_command(tmp_path: Path) -> None:
    out = tmp_path / "profile"
    args = ["profile", "--layers", "1", "--lengths", "32,64", "--presses", "streaming_llm", "--budget", "8"]
    assert mmshiftkv_main([*args, "--decode-tokens", "3", "--device", "cpu", "--output-dir", str(out)]) == 0
    payload = json.loads((out / "profile.json").read_text())
    assert payload["budget"] == 8 and payload["decode_tokens"] == 3 and payload["dtype"] == "bfloat16"
    assert [(p["input_length"], p["method"]) for p in payload["points"]] == [
        (32, "FullKV"),
        (32, "StreamingLLM"),
        (64, "FullKV"),
        (64, "StreamingLLM"),
    ]
    assert (out / "fig3_profile.png").read_bytes()[:4] == b"\x89PNG"
