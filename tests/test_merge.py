"""The merge step: evicted KV folded into the kept entries, against per-head loops and the released code.

Oracles (``tests/data/lookm``, ``tests/data/meda``): inputs and outputs of the released LOOK-M code
(SUSTechBruce/LOOK-M @ ecf0f51, ``kv_token_merge/modify_llama.py``: ``PivotKVCache_LayerWise``,
``AVGMergeKVCache_LayerWise``, ``WeightedMergeKVCache_LayerWise`` and their ``Text*`` variants) and of
MEDA's (AIoT-MLSys-Lab/MEDA @ 0e1a53b: ``AttnEntropyTextAVGMergeKVCache_LayerWise``,
``AttnEntropyTextPivotMerge_LayerWise``), run outside this repository on recorded fp32 tensors.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.allocators import AdaAllocator
from mmshiftkv.cache import CompressedLayer, cache_argument
from mmshiftkv.presses import LookMPress, select_kept_indices
from mmshiftkv.presses.merge import evicted_indices, merge_evicted
from mmshiftkv.testing import QUESTION, make_inputs, tiny

DATA = Path(__file__).parent / "data"
BUDGET = 24


def rule_of(variant: str) -> str | None:
    """The merge rule of a released class (``text_prior_avg_merge`` -> ``"average"``; ``h2o``: None)."""
    for token, rule in (("pivot", "pivot"), ("avg", "average"), ("weighted", "weighted")):
        if token in variant:
            return rule
    return None


def oracle_cases(folder: str) -> list[tuple[str, str]]:
    cases = []
    for path in sorted((DATA / folder).glob("*.pt")):
        data = torch.load(path, weights_only=True)
        cases += [(path.name, key.split("/")[0]) for key in data if key.endswith("/kept_indices")]
    return cases


#: Cosines closer than this to the best make a head's target ambiguous (float32 rounding picks either).
TIE = 1e-6


def plain_merge(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: list[list[list[int]]],
    real: list[list[int]],
    rule: str,
    as_released: bool,
) -> list[list[tuple[torch.Tensor, torch.Tensor, bool]]]:
    """The merge of the module docstring, one (sample, head) at a time in float64 Python loops.

    Per (sample, head): merged keys, merged values, and whether some evicted token has two kept
    targets within :data:`TIE` (in layer 0 equal tokens at offsets -d and +d have equal cosines: RoPE).
    """
    batch, heads = keys.shape[:2]
    out = [[None] * heads for _ in range(batch)]
    for b in range(batch):
        evicted = [[i for i in real[b] if i not in set(kept[b][h])] for h in range(heads)]
        best, ambiguous = [], []
        for h in range(heads):
            k_kept, k_evicted = keys[b, h, kept[b][h]].double(), keys[b, h, evicted[h]].double()
            cosines = (k_evicted @ k_kept.T) / (
                k_evicted.norm(dim=-1)[:, None] * k_kept.norm(dim=-1)[None, :]
            )
            rows = []
            for cos in cosines.tolist():
                target = max(range(len(cos)), key=lambda j: (cos[j], -j))
                rows.append((target, cos[target]))
            best.append(rows)
            top2 = cosines.topk(min(2, len(kept[b][h])), dim=-1).values
            ambiguous.append(top2.shape[-1] > 1 and bool((top2[:, 0] - top2[:, 1] < TIE).any()))
        merging = [list(range(len(evicted[h]))) for h in range(heads)]
        if as_released and rule != "pivot":
            everything = [w for rows in best for _, w in rows]
            overall = sum(everything) / len(everything)
            for h in range(heads):
                merging[h] = []
                for r in range(len(evicted[h])):
                    at_rank = [best[g][r][1] for g in range(heads) if r < len(evicted[g])]
                    if sum(at_rank) / len(at_rank) >= overall:
                        merging[h].append(r)
        for h in range(heads):
            results = []
            for states in (keys, values):
                kept_states = states[b, h, kept[b][h]].double()
                total, received = kept_states.clone(), [0] * len(kept[b][h])
                for column, r in enumerate(merging[h]):
                    target, weight = best[h][r]
                    source = evicted[h][column if as_released and rule == "average" else r]
                    x = states[b, h, source].double()
                    if rule == "pivot":
                        total[target] += (x + kept_states[target]) / 2
                    else:
                        total[target] += (weight if rule == "weighted" else 1.0) * x
                    received[target] += 1
                results.append(total / (1 + torch.tensor(received, dtype=torch.float64))[:, None])
            out[b][h] = (*results, ambiguous[h])
    return out


def random_selection(seed: int = 0):
    """A left-padded batch of 2, 3 KV heads with different kept counts per head (head-wise budgets)."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, seq_len, dim = 2, 3, 20, 8
    keys = torch.randn(batch, heads, seq_len, dim, generator=generator)
    values = torch.randn(batch, heads, seq_len, dim, generator=generator)
    key_mask = torch.ones(batch, seq_len, dtype=torch.bool)
    key_mask[1, :6] = False
    scores = torch.rand(batch, heads, seq_len, generator=generator)
    counts = torch.tensor([[4, 9, 6], [3, 7, 5]])
    indices, lengths = select_kept_indices(scores, counts, key_mask)
    return keys, values, key_mask, indices, lengths


@pytest.mark.parametrize("as_released", [False, True])
@pytest.mark.parametrize("rule", ["pivot", "average", "weighted"])
def test_head_wise_merge_equals_a_plain_per_head_recomputation(rule: str, as_released: bool):
    keys, values, key_mask, indices, lengths = random_selection()
    kept = [[indices[b, h, : lengths[b, h]].tolist() for h in range(3)] for b in range(2)]
    real = [torch.nonzero(key_mask[b]).flatten().tolist() for b in range(2)]
    expected = plain_merge(keys, values, kept, real, rule, as_released)
    merged_keys, merged_values = merge_evicted(
        keys, values, indices, lengths, key_mask, rule=rule, as_released=as_released
    )
    for b in range(2):
        for h in range(3):
            n = int(lengths[b, h])
            keys_by_hand, values_by_hand, ambiguous = expected[b][h]
            assert not ambiguous
            torch.testing.assert_close(merged_keys[b, h, :n].double(), keys_by_hand, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(merged_values[b, h, :n].double(), values_by_hand, atol=1e-5, rtol=1e-5)


def test_evicted_tokens_are_the_real_tokens_not_kept_in_temporal_order():
    _, _, key_mask, indices, lengths = random_selection()
    evicted, counts = evicted_indices(indices, lengths, 20, key_mask)
    for b in range(2):
        for h in range(3):
            kept = set(indices[b, h, : lengths[b, h]].tolist())
            expected = [i for i in range(20) if key_mask[b, i] and i not in kept]
            assert evicted[b, h, : counts[b, h]].tolist() == expected


@pytest.mark.parametrize(("name", "variant"), oracle_cases("lookm"))
def test_lookm_merge_of_the_released_selection_equals_the_released_code(name: str, variant: str):
    data = torch.load(DATA / "lookm" / name, weights_only=True)
    check_released_merge(data, variant)


@pytest.mark.parametrize(("name", "variant"), oracle_cases("meda"))
def test_meda_merge_of_the_released_selection_equals_the_released_code(name: str, variant: str):
    """MEDA's policy (recent window widened to the text length + 100, every text token kept) keeps more
    than a budget, so its selection is taken from the oracle; the merge must match exactly."""
    data = torch.load(DATA / "meda" / name, weights_only=True)
    check_released_merge(data, variant)


def check_released_merge(data: dict, variant: str) -> None:
    rule = rule_of(variant)
    kept = data[f"{variant}/kept_indices"]
    indices, lengths = kept[None], torch.full((1, kept.shape[0]), kept.shape[1])
    keys, values = data["keys"], data["values"]
    if rule is None:
        gathered = keys.gather(2, indices[..., None].expand(-1, -1, -1, keys.shape[-1]))
        assert torch.equal(gathered, data[f"{variant}/keys"])
        return
    merged_keys, merged_values = merge_evicted(keys, values, indices, lengths, rule=rule, as_released=True)
    torch.testing.assert_close(merged_keys, data[f"{variant}/keys"], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_values, data[f"{variant}/values"], atol=1e-5, rtol=0)


def stored_rows(layer: CompressedLayer, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt keys and values a CompressedLayer holds for (sample b, KV head h)."""
    for bucket in layer.buckets:
        where = torch.nonzero(bucket.samples == b).flatten()
        if where.numel():
            n = int(where[0])
            row, j = divmod(h, bucket.heads_per_row)
            start, end = int(bucket.starts[n, row, j]), int(bucket.ends[n, row, j])
            return bucket.keys[n, row, start:end], bucket.values[n, row, start:end]
    raise AssertionError(f"sample {b} is in no bucket")


def prefill(model, inputs: dict, press=None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
        model(**inputs, **cache_argument(model, cache))
    return cache


def check_stored_merge(
    full: DynamicCache, cache: DynamicCache, press: LookMPress, key_mask: torch.Tensor
) -> None:
    """Every compressed layer holds, per (sample, KV head), the merge :func:`plain_merge` recomputes from
    the uncompressed cache and the press's kept indices (heads with a tied target excepted, few)."""
    batch = key_mask.shape[0]
    real = [torch.nonzero(key_mask[b]).flatten().tolist() for b in range(batch)]
    checked = total = 0
    for layer, indices in enumerate(press.stats.indices):
        counts = press.stats.kept[layer]
        kept = [
            [indices[b, h, : counts[b, h]].tolist() for h in range(indices.shape[1])] for b in range(batch)
        ]
        compressed = cache.layers[layer]
        assert isinstance(compressed, CompressedLayer) and torch.equal(compressed.prompt_lengths, counts)
        expected = plain_merge(
            full.layers[layer].keys, full.layers[layer].values, kept, real, press.merging, False
        )
        for b, per_head in enumerate(expected):
            for h, (keys, values, ambiguous) in enumerate(per_head):
                total += 1
                if ambiguous:
                    continue
                checked += 1
                stored_keys, stored_values = stored_rows(compressed, b, h)
                torch.testing.assert_close(stored_keys.double(), keys, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(stored_values.double(), values, atol=1e-5, rtol=1e-5)
    assert checked >= 0.75 * total


@pytest.mark.parametrize("rule", ["pivot", "average", "weighted"])
def test_merged_cache_under_head_wise_budgets_equals_a_per_head_recomputation(rule: str):
    # Accumulated attention spreads AdaKV's budget unevenly over qwen3's heads (evenly on others).
    family = "qwen3"
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION, "Which colour is the box at the top left corner?"])
    full = prefill(model, inputs)
    press = LookMPress(budget=BUDGET, allocator=AdaAllocator(window=4), merging=rule)
    cache = prefill(model, inputs, press)
    assert len(set(press.stats.kept.flatten().tolist())) > 1  # really head-wise
    check_stored_merge(full, cache, press, inputs["attention_mask"].bool())
    # The merge changes values, not sizes: the same selection evicted holds exactly as many bytes.
    evicting = LookMPress(budget=BUDGET, allocator=AdaAllocator(window=4), merging=None)
    prefill(model, inputs, evicting)
    assert torch.equal(evicting.stats.kept, press.stats.kept)
    assert evicting.stats.bytes_after == press.stats.bytes_after


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("allocator", [None, AdaAllocator(window=4)], ids=["uniform", "ada"])
def test_decode_after_a_merge_equals_attention_over_the_merged_tensors_by_hand(allocator):
    family = "qwen3"
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION, "Which colour is the box at the top left corner?"])
    key_mask = inputs["attention_mask"].bool()
    full = prefill(model, inputs)
    press = LookMPress(budget=BUDGET, allocator=allocator)
    cache = DynamicCache()
    captured: dict[int, tuple] = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda m, a, kw, out: captured.__setitem__(m.layer_idx, (kw["hidden_states"], out[0])),
            with_kwargs=True,
        )
        for layer in model.model.layers
    ]
    next_token = torch.tensor([[5], [7]])
    # The manual prefill rotated the prompt at positions 0..seq_len-1; the new token comes next.
    positions = torch.full((2, 1), inputs["input_ids"].shape[1])
    try:
        with torch.no_grad(), press(model):
            model(**inputs, **cache_argument(model, cache))
            captured.clear()
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
            model(
                input_ids=next_token,
                attention_mask=mask,
                position_ids=positions,
                **cache_argument(model, cache),
            )
    finally:
        for hook in hooks:
            hook.remove()
    check_stored_merge(full, cache, press, key_mask)
    if allocator is not None:
        assert len(set(press.stats.kept.flatten().tolist())) > 1  # packed rows of different lengths
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = model.model.layers[0].self_attn.head_dim
    for layer_idx, (hidden, output) in captured.items():
        attention = model.model.layers[layer_idx].self_attn
        cos, sin = model.model.rotary_emb(hidden, positions)
        with torch.no_grad():
            q = attention.q_norm(attention.q_proj(hidden).view(2, 1, heads, head_dim)).transpose(1, 2)
            k = attention.k_norm(attention.k_proj(hidden).view(2, 1, kv_heads, head_dim)).transpose(1, 2)
            v = attention.v_proj(hidden).view(2, 1, kv_heads, head_dim).transpose(1, 2)
            q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
            rows = []
            for b in range(2):
                per_head = []
                for head in range(heads):
                    g = head // (heads // kv_heads)
                    kept_keys, kept_values = stored_rows(cache.layers[layer_idx], b, g)
                    keys = torch.cat([kept_keys.float(), k[b, g]], dim=0)
                    vals = torch.cat([kept_values.float(), v[b, g]], dim=0)
                    weights = torch.softmax(q[b, head] @ keys.T * attention.scaling, dim=-1)
                    per_head.append(weights @ vals)
                rows.append(torch.cat(per_head, dim=-1))
            expected = attention.o_proj(torch.stack(rows))
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)
