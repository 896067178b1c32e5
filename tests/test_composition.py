"""Press x allocator composition under generate, and the memory held by head-wise budgets."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.allocators import AdaAllocator, PyramidAllocator, SparseMMAllocator, UniformAllocator
from mmshiftkv.cache import CompressedLayer, cache_argument
from mmshiftkv.presses import BudgetPress, ExternalScorerPress, FullKVPress, ShiftKVPress
from mmshiftkv.registry import PRESSES
from mmshiftkv.testing import QUESTION, greedy, make_inputs, tiny

BUDGET, WINDOW = 12, 4


class KeyNormScorer:
    """A kvpress-style scorer (``score(module, hidden_states, keys, values, attentions, kwargs)``) that
    ranks keys by their negated L2 norm, as kvpress's KnormPress does."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        return -keys.float().norm(dim=-1)


def sparsemm_scores(layers: int = 2, heads: int = 4) -> dict[str, list[float]]:
    """A visual-head score file in the reference format, uneven across heads."""
    return {
        f"{layer}-{head}": [float(1 + layer * heads + head), 0.5]
        for layer in range(layers)
        for head in range(heads)
    }


def allocators():
    return [
        UniformAllocator(),
        PyramidAllocator(beta=20, window=WINDOW),
        AdaAllocator(alpha=0.2, window=WINDOW),
        SparseMMAllocator(head_scores=sparsemm_scores(), ratio=0.1, window=WINDOW),
    ]


def press_variants(allocator):
    for press_cls in PRESSES.values():
        if press_cls is FullKVPress:
            continue
        extra = {"n_proxies": 64, "n_groups": 8} if press_cls is ShiftKVPress else {}
        yield press_cls(budget=BUDGET, allocator=allocator, **extra)
    yield ExternalScorerPress(press=KeyNormScorer(), budget=BUDGET, allocator=allocator)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava-next"])
def test_every_press_composes_with_every_allocator(family: str):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"], image_seeds=[0, 1])
    for allocator in allocators():
        for press in press_variants(allocator):
            with press(model):
                tokens = greedy(model, inputs, max_new_tokens=3)
            assert tokens.shape[0] == 2
            kept = press.stats.kept
            assert kept.min() >= 1
            if not allocator.needs_scores:  # Ada's counts depend on the press's scores (tested below)
                # Each sample gets the allocator's own table for its prompt length.
                n_tokens = torch.tensor(press.stats.prompt_tokens)
                for layer in range(kept.shape[0]):
                    assert torch.equal(kept[layer], allocator.allocate(BUDGET, layer, n_tokens))


def test_ada_counts_follow_the_press_scores_and_keep_the_total():
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    press = ShiftKVPress(
        budget=BUDGET, allocator=AdaAllocator(alpha=0.2, window=WINDOW), n_proxies=64, n_groups=8
    )
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, cache))
    kv_heads = model.config.get_text_config().num_key_value_heads
    per_layer = press.stats.kept.sum(-1)[:, 0]
    # Floor int(B' * alpha) and rounding move the total by less than one token per head.
    assert (per_layer - kv_heads * BUDGET).abs().max() <= kv_heads
    assert len(set(press.stats.kept.flatten().tolist())) > 1  # really head-wise


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava"])
def test_head_wise_budgets_hold_only_the_kept_tokens(family: str):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"], image_seeds=[0, 1])
    press = ShiftKVPress(budget=BUDGET, allocator=AdaAllocator(window=WINDOW), n_proxies=64, n_groups=8)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, cache))
    config = model.config.get_text_config()
    head_dim = config.hidden_size // config.num_attention_heads
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, CompressedLayer)
        assert torch.equal(layer.prompt_lengths, press.stats.kept[layer_idx])
        ideal = int(press.stats.kept[layer_idx].sum()) * 2 * head_dim * 4
        assert layer.ideal_nbytes == ideal
        assert layer.nbytes <= 1.05 * ideal + 512  # no padding to the layer's largest head budget


def test_sparsemm_file_for_another_model_is_rejected():
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    allocator = SparseMMAllocator(head_scores=sparsemm_scores(layers=3, heads=4), window=WINDOW)
    press = PRESSES["snapkv"](budget=BUDGET, allocator=allocator, window_size=WINDOW)
    with (
        pytest.raises(ValueError, match="3 layers x 4 query heads, but the model has 2 layers"),
        press(model),
    ):
        model(**inputs)


def test_allocator_requires_a_budget():
    with pytest.raises(ValueError, match="pass budget"):
        PRESSES["snapkv"](compression_ratio=0.5, allocator=UniformAllocator())


def test_budget_press_is_the_deprecated_name_of_external_scorer_press():
    with pytest.warns(DeprecationWarning, match="renamed ExternalScorerPress") as record:
        press = BudgetPress(press=KeyNormScorer(), budget=BUDGET)
    assert record[0].filename == __file__  # the warning points at the caller
    assert isinstance(press, ExternalScorerPress) and press.budget == BUDGET
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        ExternalScorerPress(press=KeyNormScorer(), budget=BUDGET)
