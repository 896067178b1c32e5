"""Copies that stay copies: reused presses, used presses, copied and pickled compressed caches.

Oracles: a fresh press on the same weights, the untouched original, a fresh prefill and decode.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from mmshiftkv.allocators import PyramidAllocator
from mmshiftkv.cache import CompressedLayer, GuardedCache, cache_argument, returned_cache
from mmshiftkv.cache.compat import prompt_cache_argument
from mmshiftkv.models import get_adapter
from mmshiftkv.presses import PressUsageError, ShiftKVPress, SnapKVPress, UnsupportedCacheError
from mmshiftkv.testing import QUESTION, build_tiny_model, make_inputs, tiny

BUDGET = 8
#: Fewer proxies than the paper's 512: the same code paths, a tenth of the time.
SHIFTKV = dict(budget=BUDGET, n_proxies=64, n_groups=8)


def prefill(model, inputs: dict, press) -> DynamicCache:
    """The prompt cache compressed by ``press``, built the way the model builds its cache."""
    argument = prompt_cache_argument(model)
    with torch.no_grad(), press(model):
        out = model(**inputs, **argument, use_cache=True)
    return next(iter(argument.values())) if argument else returned_cache(out)


def decode(model, cache, press, inputs: dict, token: int = 5) -> torch.Tensor:
    """Logits of one more token after the prompt, read from ``cache`` under ``press``."""
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], 1)
    step = {"input_ids": torch.full_like(inputs["input_ids"][:, :1], token), "attention_mask": mask}
    with torch.no_grad(), press(model):
        return model(**step, **cache_argument(model, cache)).logits[:, -1]


def tensors_of(value) -> list[torch.Tensor]:
    """Every tensor a cache holds (layers, buckets, linear-attention states), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in tensors_of(value[key])]
    if isinstance(value, list | tuple):
        return [t for item in value for t in tensors_of(item)]
    if hasattr(value, "__dict__") and not isinstance(value, type | nn.Module):
        return tensors_of(vars(value))
    return []


def assert_same_cache(cache, snapshot) -> None:
    mine, theirs = tensors_of(cache.layers), tensors_of(snapshot.layers)
    assert len(mine) == len(theirs) > 0
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert cache.get_seq_length() == snapshot.get_seq_length()


# ----------------------------------------------------------------------------------- reused presses


def test_a_reused_shiftkv_press_notices_q_proj_weights_changed_through_data():
    model, tokenizer = build_tiny_model("qwen2")  # its own: the test changes its weights
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    adapter = get_adapter(model)
    reused = ShiftKVPress(**SHIFTKV)
    prefill(model, inputs, reused)
    before = [indices.clone() for indices in reused.stats.indices]
    kept = [entry.projected for entry in reused._noise_projections.values()]
    prefill(model, inputs, reused)
    # Unchanged weights: the kept projections serve the next prefill (nothing recomputed).
    assert all(entry.projected is old for entry, old in zip(reused._noise_projections.values(), kept))

    def changed_through_data(change) -> None:
        versions = [m.q_proj.weight._version for m in adapter.attention_modules]
        with torch.no_grad():
            for module in adapter.attention_modules:
                change(module.q_proj.weight.data)
        assert [m.q_proj.weight._version for m in adapter.attention_modules] == versions  # unseen by it
        prefill(model, inputs, reused)
        fresh = ShiftKVPress(**SHIFTKV)
        prefill(model, inputs, fresh)
        assert all(torch.equal(a, b) for a, b in zip(reused.stats.indices, fresh.stats.indices))

    changed_through_data(lambda weight: weight.mul_(-1))  # the case
    assert any(not torch.equal(a, b) for a, b in zip(before, reused.stats.indices))
    # A PEFT-style merge of a low-rank delta, and a small change of one weight.
    delta = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    changed_through_data(lambda weight: weight.add_(0.5 * delta @ delta[: weight.shape[1]].T))
    changed_through_data(lambda weight: weight[3, 5].add_(1e-4))
    hidden = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(1))
    for module in adapter.attention_modules:  # the proxies themselves, against a fresh press
        torch.testing.assert_close(
            reused.proxy_queries(adapter, module, hidden),
            ShiftKVPress(**SHIFTKV).proxy_queries(adapter, module, hidden),
            rtol=0,
            atol=0,
        )


# ----------------------------------------------------------------------------------- used presses


def reachable(root, kind: type, limit: int = 10_000) -> list:
    """Objects of ``kind`` reachable from ``root`` through attributes and containers."""
    seen, found, stack = set(), [], [root]
    while stack and len(seen) < limit:
        value = stack.pop()
        if id(value) in seen or isinstance(value, torch.Tensor | type | str | int | float):
            continue
        seen.add(id(value))
        if isinstance(value, kind):
            found.append(value)
            continue
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, list | tuple | set):
            stack += list(value)
        elif isinstance(value, weakref.WeakKeyDictionary):
            stack += list(value.values())
        elif hasattr(value, "__dict__"):
            stack += list(vars(value).values())
    return found


@pytest.mark.parametrize(
    "make",
    [
        lambda: ShiftKVPress(budget=BUDGET),
        lambda: SnapKVPress(budget=BUDGET, window_size=4, allocator=PyramidAllocator(window=4)),
    ],
)
def test_a_used_press_holds_no_model(make):
    model, processor = build_tiny_model("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    press = make()
    unused = len(pickle.dumps(press))
    with torch.no_grad(), press(model):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with pytest.raises(PressUsageError, match="output_attentions"), torch.no_grad(), press(model):
        model.generate(**inputs, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    with pytest.raises(KeyError), torch.no_grad(), press(model):  # the caller's own error inside the block
        model(**inputs, **prompt_cache_argument(model))
        raise KeyError("boom")
    assert not reachable(press, nn.Module)
    # Pickled and deep-copied: the settings and the last statistics (a few ints per layer), no model.
    assert len(pickle.dumps(press)) < unused + 2048
    assert not reachable(copy.deepcopy(press), nn.Module)
    model_alive = weakref.ref(model)
    del model
    gc.collect()
    assert model_alive() is None


def test_a_copied_press_selects_as_a_fresh_one_on_another_model():
    model_a, tokenizer = tiny("qwen2")
    model_b, _ = build_tiny_model("qwen2", seed=1)
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    press = ShiftKVPress(**SHIFTKV)
    prefill(model_a, inputs, press)
    copied, fresh = copy.deepcopy(press), ShiftKVPress(**SHIFTKV)
    prefill(model_b, inputs, copied)
    prefill(model_b, inputs, fresh)
    assert all(torch.equal(a, b) for a, b in zip(copied.stats.indices, fresh.stats.indices))


# ------------------------------------------------------------------------------ copied caches


@pytest.mark.parametrize("family", ["qwen2", "gemma3-text", "qwen3.5-text"])
def test_a_deep_copied_compressed_cache_is_an_independent_copy(family: str):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    press = SnapKVPress(budget=BUDGET)
    if not prompt_cache_argument(model):  # Qwen3.5 on transformers 5.2: its own cache class, refused
        with pytest.raises(UnsupportedCacheError):
            prefill(model, inputs, press)
        return
    cache = prefill(model, inputs, press)
    assert isinstance(cache, GuardedCache) and any(isinstance(x, CompressedLayer) for x in cache.layers)
    untouched = copy.deepcopy(cache)
    copied = copy.deepcopy(cache)
    compressed = [layer for layer in copied.layers if isinstance(layer, CompressedLayer)]
    assert all(layer.reader is model for layer in compressed)  # the same model, not a copy of it
    # The copy decodes as a fresh prefill would (the real model reads it), and the original stays.
    logits = decode(model, copied, press, inputs)
    fresh = prefill(model, inputs, SnapKVPress(budget=BUDGET))
    torch.testing.assert_close(logits, decode(model, fresh, press, inputs))
    assert_same_cache(cache, untouched)
    assert copied.get_seq_length() == cache.get_seq_length() + 1
    # The copy's crop cuts the copy (atomically), never the original.
    with pytest.raises(ValueError, match="compressed"):
        copied.crop(-2)
    assert copied.get_seq_length() == cache.get_seq_length() + 1
    if family == "qwen2":  # layers without linear-attention state can be cropped back
        copied.crop(-1)
        assert copied.get_seq_length() == cache.get_seq_length()
    assert_same_cache(cache, untouched)
    # Pickled: a working cache again (its layers belong to no model object; the press's model reads it).
    loaded = pickle.loads(pickle.dumps(cache))
    assert isinstance(loaded, GuardedCache)
    assert all(layer.reader is None for layer in loaded.layers if isinstance(layer, CompressedLayer))
    torch.testing.assert_close(decode(model, loaded, press, inputs), logits)


def test_prompt_reuse_recipe_with_generate():
    """transformers' recipe: prefill a shared prefix once, deep-copy its cache for each continuation."""
    model, tokenizer = tiny("qwen2")
    prefix = make_inputs("qwen2", tokenizer, [QUESTION])
    press = SnapKVPress(budget=BUDGET)
    cache = prefill(model, prefix, press)
    answers = []
    for suffix in ([7, 8, 9], [10, 11]):
        ids = torch.cat([prefix["input_ids"], torch.tensor([suffix])], 1)
        with torch.no_grad(), press(model):
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **cache_argument(model, copy.deepcopy(cache)),
                max_new_tokens=3,
                do_sample=False,
            )
        fresh = prefill(model, prefix, SnapKVPress(budget=BUDGET))  # the oracle: a new prefill each time
        with torch.no_grad(), press(model):
            expected = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **cache_argument(model, fresh),
                max_new_tokens=3,
                do_sample=False,
            )
        assert torch.equal(out, expected)
        answers.append(out)
    assert cache.get_seq_length() == prefix["input_ids"].shape[1]
