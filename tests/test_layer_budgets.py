"""The whole-model allocation path: apportionment rule, exact totals, deferred compression, composition."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mmshiftkv.allocators import MEDAAllocator, UniformAllocator, VLCacheAllocator
from mmshiftkv.allocators.layer_budgets import apportion
from mmshiftkv.cache import CompressedLayer
from mmshiftkv.models import get_adapter
from mmshiftkv.presses import CompressionSkippedWarning, ShiftKVPress, SnapKVPress
from mmshiftkv.registry import FULL, PRESSES, make_press
from mmshiftkv.testing import QUESTION, greedy, make_inputs, tiny_sharpened


def bisected_apportion(weights: list[float], total: int, low: int, high: int) -> list[int]:
    """The rule written independently: bisect the level ``lam`` of ``clip(lam * w, low, high)``
    (zero-weight layers take what weighted layers at ``high`` leave), then the largest remainders."""

    def level(w: list[float], target: float) -> list[float]:
        lo, hi = 0.0, 2 * high / min(x for x in w if x > 0)
        for _ in range(400):
            mid = (lo + hi) / 2
            if sum(min(max(mid * x, low), high) for x in w) < target:
                lo = mid
            else:
                hi = mid
        return [min(max(hi * x, low), high) for x in w]

    if not any(w > 0 for w in weights):
        weights = [1.0] * len(weights)
    values = level(weights, total)
    zero = [i for i, w in enumerate(weights) if w <= 0]
    left = total - sum(v for i, v in enumerate(values) if i not in zero)
    if zero and left > len(zero) * low + 0.5:
        for i, v in zip(zero, level([1.0] * len(zero), left)):
            values[i] = v
    floors = [int(v // 1) for v in values]
    order = sorted(
        (i for i in range(len(values)) if floors[i] < high), key=lambda i: (-(values[i] - floors[i]), i)
    )
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors


def test_apportion_hand_tables():
    # 2.33 / 4.67 -> floors 2 + 4, the one token left goes to the larger remainder (.67).
    assert apportion(torch.tensor([1.0, 2.0]), 7, 1, 100).tolist() == [2, 5]
    # 24.6 > 12 is pinned at 12; the others share 20: 6.67 each -> 6, 6, 6 + 2, ties to the lower layer.
    assert apportion(torch.tensor([10.0, 1.0, 1.0, 1.0]), 32, 1, 12).tolist() == [12, 7, 7, 6]
    # Zero weights keep the floor while a weighted layer can take more ...
    assert apportion(torch.tensor([0.0, 0.0, 1.0]), 10, 1, 12).tolist() == [1, 1, 8]
    # ... and share evenly what the weighted ones cannot hold; all-zero weights share evenly.
    assert apportion(torch.tensor([0.0, 0.0, 1.0]), 30, 1, 12).tolist() == [9, 9, 12]
    assert apportion(torch.tensor([0.0, 0.0, 0.0]), 30, 1, 12).tolist() == [10, 10, 10]
    assert apportion(torch.tensor([1.0, 1.0, 1.0]), 3, 1, 12).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="cannot share 40 tokens between 3 layers"):
        apportion(torch.tensor([1.0, 1.0, 1.0]), 40, 1, 12)
    with pytest.raises(ValueError, match="finite"):
        apportion(torch.tensor([1.0, float("nan")]), 4, 1, 12)


def test_apportion_equals_a_bisected_level_and_keeps_the_total():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        n_layers = int(torch.randint(1, 9, (1,), generator=generator))
        high = int(torch.randint(2, 200, (1,), generator=generator))
        low = int(torch.randint(1, high, (1,), generator=generator))
        per_layer = int(torch.randint(low, high + 1, (1,), generator=generator))
        weights = torch.rand(n_layers, generator=generator, dtype=torch.float64) ** 3
        weights[torch.rand(n_layers, generator=generator) < 0.15] = 0.0
        counts = apportion(weights, n_layers * per_layer, low, high)
        assert int(counts.sum()) == n_layers * per_layer
        assert counts.min() >= low and counts.max() <= high
        assert counts.tolist() == bisected_apportion(weights.tolist(), n_layers * per_layer, low, high)


@pytest.mark.parametrize("allocator", [MEDAAllocator(), VLCacheAllocator()])
def test_allocate_layers_keeps_short_prompts_whole_and_totals_exact(allocator):
    allocator.bind(n_layers=3, n_heads=4, n_kv_heads=2)
    statistics = torch.tensor([[0.2, 0.9], [0.5, 0.1], [0.8, 0.3]], dtype=torch.float64)
    counts = allocator.allocate_layers(10, torch.tensor([40, 7]), statistics)
    assert counts.shape == (3, 2, 2)
    assert counts[:, 1].eq(7).all()  # 7 <= budget: uncompressed in every layer
    assert int(counts[:, 0, 0].sum()) == 30 and counts[:, 0].min() >= 1
    assert torch.equal(counts[:, :, 0], counts[:, :, 1])  # a layer's heads keep the same count
    with pytest.raises(TypeError, match="allocate_layers"):
        allocator.allocate(10, 0, torch.tensor([40]))


def shared_layers(press) -> list[int]:
    """Ordinals of the layers the press shared its budget between (the others keep a window: NaN)."""
    return [i for i, stat in enumerate(press.stats.layer_statistics[:, 0].tolist()) if not math.isnan(stat)]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3"])
def test_deferred_compression_holds_exactly_the_shared_budget(family: str):
    """Every layer is compressed after the prefill to its share; sliding layers keep their window."""
    model, processor = tiny_sharpened(family)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"])
    budget = 10
    press = SnapKVPress(budget=budget, window_size=4, allocator=MEDAAllocator())
    with press(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    lengths = torch.tensor(press.stats.prompt_tokens)
    shared = shared_layers(press)
    assert shared
    kept = press.stats.kept[shared]  # (layers, batch, kv_heads)
    assert torch.equal(kept.sum(0), (len(shared) * lengths.clamp(max=budget))[:, None].expand_as(kept[0]))
    for ordinal, module in enumerate(get_adapter(model).attention_modules):
        layer = cache.layers[module.layer_idx]
        if ordinal in shared:
            assert isinstance(layer, CompressedLayer)
            assert torch.equal(layer.prompt_lengths, press.stats.kept[ordinal])
            assert layer.nbytes <= press.stats.bytes_before
        else:
            assert not isinstance(layer, CompressedLayer)
    assert press.stats.bytes_after < press.stats.bytes_before


def test_whole_model_allocators_compose_with_any_press_and_generate_like_one_by_one():
    """ShiftKV, SnapKV and VL-Cache's press under MEDA / VL-Cache allocations: a left-padded batch gives
    each sample the statistics, counts and greedy tokens it gets alone."""
    family = "qwen2.5-vl"
    model, processor = tiny_sharpened(family)
    questions = [QUESTION, "Which colour is the box at the top left corner?"]
    batched = make_inputs(family, processor, questions)
    for press in (
        ShiftKVPress(budget=12, allocator=MEDAAllocator(), n_proxies=64, n_groups=8),
        SnapKVPress(budget=12, window_size=4, allocator=MEDAAllocator.reference()),
        make_press("vlcache", budget=12),
    ):
        with press(model):
            together = greedy(model, batched, max_new_tokens=3)
        kept, statistics = press.stats.kept, press.stats.layer_statistics
        assert kept[:, :, 0].sum(0).tolist() == [2 * min(12, n) for n in press.stats.prompt_tokens]
        assert kept[:, 0, 0].tolist() != [12, 12]
        for i, question in enumerate(questions):
            alone_inputs = make_inputs(family, processor, [question], image_seeds=[i])
            with press(model):
                alone = greedy(model, alone_inputs, max_new_tokens=3)
            name = (type(press).__name__, type(press.allocator).__name__, i)
            alone_statistics = press.stats.layer_statistics[:, 0]
            torch.testing.assert_close(statistics[:, i], alone_statistics, rtol=1e-4, atol=1e-6)
            assert torch.equal(kept[:, i], press.stats.kept[:, 0]), name
            assert torch.equal(together[i, : alone.shape[1]], alone[0]), name


@pytest.mark.parametrize("allocator", [MEDAAllocator(), VLCacheAllocator()], ids=["meda", "vlcache"])
def test_every_registered_press_composes_with_the_whole_model_allocators(allocator):
    model, processor = tiny_sharpened("llava")
    inputs = make_inputs("llava", processor, [QUESTION, "Short?"])
    for name in PRESSES:
        if name == FULL:
            continue
        extra = {"n_proxies": 64, "n_groups": 8} if name == "shiftkv" else {}
        press = make_press(name, budget=10, allocator=allocator, **extra)
        with press(model):
            tokens = greedy(model, inputs, max_new_tokens=1)
        assert tokens.shape[0] == 2
        kept = press.stats.kept[:, :, 0]
        assert kept.sum(0).tolist() == [2 * min(10, n) for n in press.stats.prompt_tokens], name
        assert kept[:, 0].tolist() != [10, 10], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_get_finite_statistics_and_exact_totals(dtype: torch.dtype):
    """The released MEDA code's entropy is NaN in fp16 (its clamp bound 1e-12 is 0 there); ours is float32."""
    model, processor = tiny_sharpened("llava", dtype=dtype)
    inputs = make_inputs("llava", processor, [QUESTION, "Short?"])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    for press in (
        make_press("vlcache", budget=10),
        SnapKVPress(budget=10, window_size=4, allocator=MEDAAllocator()),
        SnapKVPress(budget=10, window_size=4, allocator=MEDAAllocator(entropy="prompt")),
    ):
        with press(model), warnings.catch_warnings():
            warnings.simplefilter("error", CompressionSkippedWarning)
            tokens = greedy(model, inputs, max_new_tokens=3)
        assert tokens.shape[0] == 2
        assert torch.isfinite(press.stats.layer_statistics).all()
        totals = press.stats.kept[:, :, 0].sum(0).tolist()
        assert totals == [2 * min(10, n) for n in press.stats.prompt_tokens]
        assert press.stats.kept[:, 0, 0].tolist() != [10, 10]  # the sharpened layer gets less


def test_uniform_allocation_is_unchanged_by_the_deferred_path():
    """A per-layer allocator still compresses each layer at its attention (no layer statistics)."""
    model, processor = tiny_sharpened("llava")
    inputs = make_inputs("llava", processor, [QUESTION])
    press = SnapKVPress(budget=8, window_size=4, allocator=UniformAllocator())
    with press(model):
        greedy(model, inputs, max_new_tokens=2)
    assert press.stats.layer_statistics is None and press.stats.kept.eq(8).all()
