"""kvpress interop, on the transformers releases kvpress supports (CI's oldest-transformers run).

kvpress's scorers under our budgets and caches, and our presses inside kvpress's own machinery
(its ``ScorerPress.__call__``, its AdaKV wrapper, its pipeline), checked against plain
re-computations of what each side keeps.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.testing import QUESTION, make_inputs, tiny

kvpress = pytest.importorskip("kvpress")

from mmshiftkv.cache import CompressedLayer  # noqa: E402
from mmshiftkv.interop.kvpress import to_kvpress  # noqa: E402
from mmshiftkv.presses import ExternalScorerPress, LastAttnPress, ScoringState, ShiftKVPress  # noqa: E402

BUDGET = 8


def prefill(model, inputs: dict, press) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(**inputs, past_key_values=cache)
    return cache


def test_kvpress_scorer_under_our_budget_keeps_its_top_scores():
    model, processor = tiny("llama")
    inputs = make_inputs("llama", processor, [QUESTION])
    plain = DynamicCache()
    with torch.no_grad():
        model(**inputs, past_key_values=plain)
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
def test_our_press_inside_kvpress_keeps_kvpress_count_and_our_ranking(family: str):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    seq_len = inputs["input_ids"].shape[1]
    press = LastAttnPress()
    scorer = to_kvpress(press, compression_ratio=0.5)
    assert isinstance(scorer, kvpress.ScorerPress)
    captured: dict[int, tuple] = {}
    decoder = model.model
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__(m.layer_idx, kw["hidden_states"]), with_kwargs=True
        )
        for layer in decoder.layers
    ]
    plain = DynamicCache()
    with torch.no_grad():
        model(**inputs, past_key_values=plain)
    for hook in hooks:
        hook.remove()
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


def test_our_press_runs_in_kvpress_adakv_wrapper_and_pipeline():
    model, processor = tiny("llama")
    inputs = make_inputs("llama", processor, [QUESTION])
    ada = kvpress.AdaKVPress(press=to_kvpress(ShiftKVPress(n_proxies=64, n_groups=8), compression_ratio=0.5))
    cache = prefill(model, inputs, ada)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]  # AdaKV masks, it does not shrink

    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=processor)
    answer = pipe(
        "A long context about coloured boxes. " * 4,
        question="Which colour?",
        press=to_kvpress(ShiftKVPress(n_proxies=64, n_groups=8), compression_ratio=0.5),
        max_new_tokens=3,
    )
    assert isinstance(answer["answer"], str)
