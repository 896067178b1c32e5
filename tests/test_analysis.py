"""Fig. 1 analyses: hidden-state statistics and attention coverage, against plain recomputations."""

from __future__ import annotations

import pytest
import torch

from mmshiftkv.cache.compat import cache_argument, returned_cache
from mmshiftkv.evaluation.analysis import analyze_samples, attention_coverage, hidden_state_shift
from mmshiftkv.presses import FullKVPress, SnapKVPress, StreamingLLMPress
from mmshiftkv.testing import QUESTION, make_inputs, tiny


def test_full_kv_covers_everything_and_presses_stay_in_unit_interval():
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    full = attention_coverage(model, inputs, FullKVPress(), max_new_tokens=4)
    assert torch.allclose(full.per_step, torch.ones_like(full.per_step))
    snap = attention_coverage(model, inputs, SnapKVPress(budget=8, window_size=4), max_new_tokens=4)
    assert snap.per_step.shape == (3, 2, 1, 2)
    assert float(snap.per_step.min()) >= 0.0 and float(snap.per_step.max()) <= 1.0
    assert snap.mean < 1.0
    assert model.config._attn_implementation == "sdpa"


def test_coverage_equals_a_step_by_step_recomputation():
    """StreamingLLM keeps 4 sinks + the most recent tokens: coverage computed by hand from a manual decode."""
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, [QUESTION])
    seq_len, budget, steps = inputs["input_ids"].shape[1], 10, 3
    coverage = attention_coverage(model, inputs, StreamingLLMPress(budget=budget), max_new_tokens=steps + 1)
    kept = torch.zeros(seq_len, dtype=torch.bool)
    kept[:4] = True
    kept[seq_len - (budget - 4) :] = True

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            cache, token = returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
            mask = inputs["attention_mask"]
            for step in range(steps):
                mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
                out = model(
                    input_ids=token,
                    attention_mask=mask,
                    output_attentions=True,
                    **cache_argument(model, cache),
                )
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                for layer, probs in enumerate(out.attentions):
                    prompt = probs[0, :, -1, :seq_len]
                    share = prompt[:, kept].sum(-1) / prompt.sum(-1)  # per query head
                    expected = share.view(2, 2).mean(-1)  # 2 KV heads x 2 query heads each
                    torch.testing.assert_close(
                        coverage.per_step[step, layer, 0], expected, atol=1e-5, rtol=1e-5
                    )
    finally:
        model.set_attn_implementation("sdpa")


def test_hidden_state_shift_prefill_statistics_match_the_layer_inputs():
    model, processor = tiny("qwen2-vl")
    inputs = make_inputs("qwen2-vl", processor, [QUESTION])
    shifts = hidden_state_shift(model, inputs, max_new_tokens=4)
    decoder = model.model.language_model
    with torch.no_grad():
        residuals = model(**inputs, output_hidden_states=True).hidden_states
        for layer, shift in enumerate(shifts):
            attention_input = decoder.layers[layer].input_layernorm(residuals[layer])
            assert abs(shift.prefill_mean - float(attention_input.mean())) < 1e-5
            assert abs(shift.prefill_std - float(attention_input.std())) < 1e-4
            assert shift.decode_std > 0


def test_analyze_samples_refuses_an_empty_list_of_conversations():
    model, processor = tiny("qwen2.5-vl")
    with pytest.raises(ValueError, match="conversations is empty"):
        analyze_samples(model, processor, [], ["full"], budget=8)
