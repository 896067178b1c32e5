"""kvpress interop: kvpress's scorers under our budgets and caches, our presses inside kvpress's own
machinery (its ``ScorerPress.__call__``, its AdaKV / CriticalAdaKV / LU-KV wrappers, its decoding
presses, its pipeline), checked against plain re-computations of what each side keeps.

CI runs it on transformers 5.2.0 and on the newest release (kvpress installed ``--no-deps``); the
tests that enter kvpress's own ``with press(model):`` run where its hook can (``kvpress_own_hooks_run``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.testing import (
    QUESTION,
    capture_attention_calls,
    chat_inputs,
    kvpress_leftovers_removed,
    make_inputs,
    tiny,
)

kvpress = pytest.importorskip("kvpress")

from mmshiftkv.cache import CompressedLayer, cache_argument  # noqa: E402
from mmshiftkv.interop.kvpress import to_kvpress  # noqa: E402
from mmshiftkv.presses import (  # noqa: E402
    ExpectedAttentionPress,
    ExternalScorerPress,
    LastAttnPress,
    ScoringState,
    ShiftKVPress,
    StreamingLLMPress,
    VLCachePress,
)

BUDGET = 8


def prefill(model, inputs: dict, press) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad(), kvpress_leftovers_removed(model), press(model):
        model(**inputs, **cache_argument(model, cache))
    return cache


def test_kvpress_scorer_under_our_budget_keeps_its_top_scores():
    model, processor = tiny("llama")
    inputs = make_inputs("llama", processor, [QUESTION])
    plain = DynamicCache()
    with torch.no_grad():
        model(**inputs, **cache_argument(model, plain))
    cache = prefill(model, inputs, ExternalScorerPress(press=kvpress.KnormPress(), budget=BUDGET))
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, CompressedLayer)
        keys = plain.layers[layer_idx].keys[0]
        seq_len = keys.shape[1]
        # KnormPress: score = -||k||; we keep the last token plus the best BUDGET - 1 others (equal
        # norms, frequent for repeated tokens, go to the earlier token).
        ranked = torch.sort(-keys[:, :-1].norm(dim=-1), dim=-1, descending=True, stable=True).indices
        others = ranked[:, : BUDGET - 1].sort(-1).values
        expected = torch.cat([others, torch.full((keys.shape[0], 1), seq_len - 1)], dim=-1)
        gathered = keys.gather(1, expected[..., None].expand(-1, -1, keys.shape[-1]))
        torch.testing.assert_close(layer.keys[0], gathered)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_our_press_inside_kvpress_keeps_kvpress_count_and_our_ranking(family: str, kvpress_own_hooks_run):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    seq_len = inputs["input_ids"].shape[1]
    press = LastAttnPress()
    scorer = to_kvpress(press, compression_ratio=0.5)
    assert isinstance(scorer, kvpress.ScorerPress)
    decoder = model.model
    calls, plain = capture_attention_calls(model, inputs)
    captured = [call["hidden_states"] for call in calls]
    cache = prefill(model, inputs, scorer)
    n_kept = int(seq_len * 0.5)
    from mmshiftkv.models import get_adapter

    adapter = get_adapter(model)
    positions = torch.arange(seq_len)[None]
    for layer_idx, layer in enumerate(cache.layers):
        # kvpress's own contract: a plain DynamicLayer with int(T * (1 - ratio)) keys per head.
        assert type(layer).__name__ == "DynamicLayer" and layer.keys.shape[2] == n_kept
        keys = plain.layers[layer_idx].keys
        module = decoder.layers[layer_idx].self_attn
        with torch.no_grad(), press.scoring(ScoringState(adapter=adapter, positions=positions)):
            scores = press.score(module, captured[layer_idx], keys, plain.layers[layer_idx].values, None, {})
        # The last query's attention, recomputed by hand from the model's own rotated queries.
        last = captured[layer_idx][:, -1:]
        query = adapter.apply_rope(adapter.query_states(module, last), positions[:, -1:])
        logits = query @ keys.repeat_interleave(2, dim=1).transpose(-1, -2) * module.scaling
        by_hand = logits.softmax(-1)[:, :, 0].view(1, 2, 2, seq_len).mean(2)
        torch.testing.assert_close(scores, by_hand, atol=1e-5, rtol=1e-4)
        top = scores.topk(n_kept, dim=-1).indices
        expected = keys.gather(2, top[..., None].expand(-1, -1, -1, keys.shape[-1]))
        torch.testing.assert_close(layer.keys, expected)


def test_vlcache_inside_kvpress_on_a_text_model_ranks_by_its_own_scores(kvpress_own_hooks_run):
    """kvpress's hooks give no token ids: a text model has no image tokens (VL-Cache uses its last
    queries), so VLCachePress runs there, keeping kvpress's count and its own ranking."""
    model, processor = tiny("llama")
    inputs = make_inputs("llama", processor, [QUESTION])
    seq_len = inputs["input_ids"].shape[1]
    press = VLCachePress()
    decoder = model.model
    calls, plain = capture_attention_calls(model, inputs)
    cache = prefill(model, inputs, to_kvpress(press, compression_ratio=0.5))
    from mmshiftkv.models import get_adapter

    state = ScoringState(
        adapter=get_adapter(model),
        positions=torch.arange(seq_len)[None],
        image_mask=torch.zeros(1, seq_len, dtype=torch.bool),
    )
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = plain.layers[layer_idx].keys, plain.layers[layer_idx].values
        module = decoder.layers[layer_idx].self_attn
        with torch.no_grad(), press.scoring(state):
            scores = press.score(module, calls[layer_idx]["hidden_states"], keys, values, None, {})
        top = scores.topk(int(seq_len * 0.5), dim=-1).indices[..., None].expand(-1, -1, -1, keys.shape[-1])
        torch.testing.assert_close(layer.keys, keys.gather(2, top))


def test_our_press_runs_in_kvpress_adakv_wrapper_and_pipeline(kvpress_own_hooks_run):
    model, processor = tiny("llama")
    inputs = make_inputs("llama", processor, [QUESTION])
    ada = kvpress.AdaKVPress(press=to_kvpress(ShiftKVPress(n_proxies=64, n_groups=8), compression_ratio=0.5))
    cache = prefill(model, inputs, ada)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]  # AdaKV masks, it does not shrink

    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=processor)
    with kvpress_leftovers_removed(model):
        answer = pipe(
            "A long context about coloured boxes. " * 4,
            question="Which colour?",
            press=to_kvpress(ShiftKVPress(n_proxies=64, n_groups=8), compression_ratio=0.5),
            max_new_tokens=3,
        )
    assert isinstance(answer["answer"], str)


def model_positions(model, inputs: dict) -> torch.Tensor:
    """The positions the model hands its rotary embedding in a plain prefill (M-RoPE: 3-D)."""
    given: list[torch.Tensor] = []

    def record(module, args, kwargs):
        values = [*args, *kwargs.values()]
        given.append(next(v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point()))

    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, **cache_argument(model, DynamicCache()))
    finally:
        hook.remove()
    return given[0]


def test_our_press_as_kvpress_press_on_qwen25_vl_scores_with_its_mrope_positions(kvpress_own_hooks_run):
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    seq_len = inputs["input_ids"].shape[1]
    positions = model_positions(model, inputs)
    assert positions.dim() == 3 and not torch.equal(positions[1], positions[2])  # an image: real M-RoPE
    press = LastAttnPress()
    calls, plain = capture_attention_calls(model, inputs)
    cache = prefill(model, inputs, to_kvpress(press, compression_ratio=0.5))
    from mmshiftkv.models import get_adapter

    adapter = get_adapter(model)
    for layer_idx, call in enumerate(calls):
        keys = plain.layers[layer_idx].keys
        with torch.no_grad(), press.scoring(ScoringState(adapter=adapter, positions=positions)):
            scores = press.score(
                call["module"], call["hidden_states"], keys, plain.layers[layer_idx].values, None, {}
            )
        top = scores.topk(int(seq_len * 0.5), dim=-1).indices
        torch.testing.assert_close(
            cache.layers[layer_idx].keys, keys.gather(2, top[..., None].expand(-1, -1, -1, 16))
        )


def test_our_press_inside_a_kvpress_wrapper_on_qwen25_vl_refuses_an_image_prompt(
    kvpress_own_hooks_run, monkeypatch
):
    model, processor = tiny("qwen2.5-vl")
    ada = kvpress.AdaKVPress(press=to_kvpress(LastAttnPress(), compression_ratio=0.5))
    with pytest.raises(ValueError, match="position_ids .* do not reproduce its own position embeddings"):
        prefill(model, make_inputs("qwen2.5-vl", processor, [QUESTION]), ada)
    # A text-only prompt has the same position on every axis: its positions are known, it runs. (Without
    # the rope_deltas of an earlier image prompt, which Qwen2.5-VL on transformers 5.2 would reuse.)
    monkeypatch.setattr(model.model, "rope_deltas", None)
    text = chat_inputs(processor, [QUESTION])
    cache = prefill(model, text, ada)
    assert cache.get_seq_length() == text["input_ids"].shape[1]


@pytest.mark.parametrize("wrapper", ["AdaKVPress", "CriticalAdaKVPress", "LUKVPress"])
def test_streaming_llm_runs_in_kvpress_wrappers_that_write_into_scores(wrapper: str, kvpress_own_hooks_run):
    model, processor = tiny("llama")
    inputs = make_inputs("llama", processor, [QUESTION])
    seq_len = inputs["input_ids"].shape[1]
    scorer = to_kvpress(StreamingLLMPress(n_sink=4), compression_ratio=0.5)
    if wrapper == "LUKVPress":
        press = kvpress.LUKVPress(press=scorer, compression_ratio=0.5)
        # Half of every head pruned (LU-KV's per-head curve, instead of the one it downloads).
        press._budget_curves = np.full((99, 2, 2), 0.5)
    else:
        press = getattr(kvpress, wrapper)(press=scorer)
    # CriticalAdaKVPress does not pass post_init_from_model on to its press (kvpress 0.5.5).
    scorer.post_init_from_model(model)
    try:
        cache = prefill(model, inputs, press)
        masked = [vars(layer.self_attn).pop("masked_key_indices") for layer in model.model.layers]
    finally:
        for layer in model.model.layers:
            vars(layer.self_attn).pop("masked_key_indices", None)
    # These wrappers mask evicted keys rather than drop them; each evicts 2 heads x (seq_len - n_kept).
    assert cache.get_seq_length() == seq_len
    n_kept = int(seq_len * 0.5)
    for _, _, seq_indices in masked:
        assert len(seq_indices) == 2 * (seq_len - n_kept)
        # The sinks stay (every wrapper); under AdaKV and LU-KV, whose ranking is StreamingLLM's alone,
        # the evicted keys are exactly the oldest ones after the sinks, on each head.
        assert bool((seq_indices >= 4).all())
        if wrapper != "CriticalAdaKVPress":
            assert sorted(seq_indices.tolist()) == sorted(list(range(4, 4 + seq_len - n_kept)) * 2)


def expected_attention_by_hand(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, next_position: int, model
) -> torch.Tensor:
    """kvpress's expected attention written out: Gaussian of the window's pre-RoPE queries, the RoPE
    matrix averaged over the next 512 positions (Llama's rotate_half rule), softmax over the keys,
    mean over query groups, times the value norms; the first 4 keys (sinks) kept."""
    queries, keys, values = queries.double(), keys.double(), values.double()
    head_dim = queries.shape[-1]
    inv_freq = model.model.rotary_emb.inv_freq.double()
    angles = torch.arange(next_position, next_position + 512).double()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = head_dim // 2
    rotate_half = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    rotate_half[:half, half:] = -torch.eye(half)
    rotate_half[half:, :half] = torch.eye(half)
    rotation = (torch.diag_embed(cos) + torch.diag_embed(sin) @ rotate_half).mean(0)
    mean = queries.mean(2)
    centered = queries - mean[:, :, None]
    cov = centered.transpose(-1, -2) @ centered / queries.shape[2]
    mean, cov = mean @ rotation.T, rotation @ cov @ rotation.T
    groups = queries.shape[1] // keys.shape[1]
    expanded = keys.repeat_interleave(groups, dim=1)
    scaling = head_dim**-0.5
    logits = torch.einsum("bhtd,bhd->bht", expanded, mean) * scaling
    logits += 0.5 * torch.einsum("bhti,bhij,bhtj->bht", expanded, cov, expanded) * scaling**2
    probs = logits.softmax(-1)
    scores = probs.view(probs.shape[0], keys.shape[1], groups, -1).mean(2) * values.norm(dim=-1)
    scores[..., :4] = float("inf")
    return scores


@pytest.mark.parametrize("decoding", ["DecodingPress", "CAMPress", "CompressionRatioDecodingPress"])
def test_expected_attention_scores_kvpress_decoding_windows(decoding: str, kvpress_own_hooks_run):
    model, processor = tiny("llama")
    inputs = make_inputs("llama", processor, [QUESTION])
    seq_len = inputs["input_ids"].shape[1]
    scorer = to_kvpress(ExpectedAttentionPress())
    calls: list[tuple] = []
    own_score = scorer.score

    def recording_score(module, hidden_states, keys, values, attentions, kwargs):
        # CAM merges into the values after scoring: keep what the scorer saw.
        calls.append((module, hidden_states.clone(), keys.clone(), values.clone()))
        scores = own_score(module, hidden_states, keys, values, attentions, kwargs)
        calls[-1] += (scores.clone(),)
        return scores

    scorer.score = recording_score
    by_ratio = decoding == "CompressionRatioDecodingPress"
    size = dict(target_compression_ratio=0.5) if by_ratio else dict(target_size=48)
    press = getattr(kvpress, decoding)(base_press=scorer, compression_interval=4, **size)
    with torch.no_grad(), kvpress_leftovers_removed(model), press(model):
        model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert calls, "the decoding press compressed nothing"
    # The first compression: 4 decoding steps buffered; the current token is the 4th generated one,
    # at position seq_len + 3.
    module, hidden_states, keys, values, scores = calls[0]
    assert hidden_states.shape[1] == 4 and keys.shape[2] == seq_len + 4
    queries = module.q_proj(hidden_states).view(1, 4, 4, 16).transpose(1, 2)
    expected = expected_attention_by_hand(queries, keys, values, seq_len + 4, model)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-7)
