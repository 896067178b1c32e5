"""The structural contract with every model family, checked against the model's own computation.

For every tiny family (1-D RoPE, split and merged M-RoPE, partial / pairwise rotary, per-layer-type
rotary, hybrid linear attention) and both attention implementations:

* the queries the adapter rotates equal the queries the model itself hands to its attention
  function (captured through transformers' public ``AttentionInterface``), at the prompt positions;
* the future positions equal the positions ``generate`` gives the decode steps;
* every KV-holding layer holds exactly the budget after prefill, layers without KV are untouched;
* FullKV equals plain ``generate``.

This file is the contract test that fails loudly when a transformers release changes how attention
layers are called, how rotary embeddings are laid out, or where caches and masks arrive.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mmshiftkv.cache import CompressedLayer, returned_cache
from mmshiftkv.models import get_adapter
from mmshiftkv.presses import FullKVPress, SnapKVPress, UnsupportedCacheError
from mmshiftkv.testing import ALL_FAMILIES, QUESTION, make_inputs, tiny

CAPTURE = "mmshiftkv_test_capture_"
_QUERIES: dict[int, torch.Tensor] = {}


def _capturing(original: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        _QUERIES[module.layer_idx] = query.detach().clone()
        return ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, **kwargs)

    return attention


AttentionInterface.register(CAPTURE + "sdpa", _capturing("sdpa"))
AttentionMaskInterface.register(CAPTURE + "sdpa", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def prompt_cache(model, inputs: dict):
    """The prompt's cache, of the class ``generate`` builds for the model (hybrid caches included).

    None when that is not a transformers ``Cache`` (Qwen3.5 on transformers 5.2 has its own class):
    a press must then refuse by name instead of compressing nothing.
    """
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    return returned_cache(out)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_adapter_rotates_queries_exactly_as_the_model(family: str):
    model, processor = tiny(family, "sdpa")
    adapter = get_adapter(model)
    inputs = make_inputs(family, processor, [QUESTION])
    hidden: dict[int, torch.Tensor] = {}
    positions: list[torch.Tensor] = []
    hooks = [
        module.register_forward_pre_hook(
            lambda m, a, kw: hidden.__setitem__(m.layer_idx, kw["hidden_states"]), with_kwargs=True
        )
        for module in adapter.attention_modules
    ]
    hooks.append(
        adapter.rotary_emb.register_forward_pre_hook(
            lambda m, a, kw: positions.append(a[1] if len(a) > 1 else kw["position_ids"]), with_kwargs=True
        )
    )
    config = adapter.text_config
    original = config._attn_implementation
    config._attn_implementation = CAPTURE + "sdpa"
    _QUERIES.clear()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        config._attn_implementation = original
        for hook in hooks:
            hook.remove()
    prompt_positions = adapter.normalize_positions(positions[0], 1)
    cache = prompt_cache(model, inputs)
    if cache is None:
        with pytest.raises(UnsupportedCacheError, match="transformers Cache"), SnapKVPress(budget=8)(model):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return
    for module in adapter.attention_modules:
        idx = module.layer_idx
        with torch.no_grad():
            adapter.rotation_style = None
            adapter.verify_rotation(module, hidden[idx], cache.layers[idx].keys, prompt_positions)
            ours = adapter.apply_rope(adapter.query_states(module, hidden[idx]), prompt_positions, module)
        torch.testing.assert_close(ours, _QUERIES[idx], atol=1e-5, rtol=1e-4)
        _check_affine_queries(adapter, module, hidden[idx], prompt_positions, _QUERIES[idx])


def _check_affine_queries(
    adapter, module, hidden: torch.Tensor, positions: torch.Tensor, queries: torch.Tensor
):
    """The model's queries, as ShiftKV forms its proxies: q_proj outputs ``offset + scale * base``
    (``offset`` the bias, ``base`` twice ``W h``, ``scale`` 1/2), through ``rotated_affine_queries``."""
    projection = adapter.query_projection(module)
    if projection is None:
        return
    with torch.no_grad():
        base = 2 * torch.nn.functional.linear(hidden[0], projection.weight)
        offset = (
            torch.zeros(1, base.shape[-1])
            if projection.bias is None
            else projection.bias.detach().float()[None]
        )
        rotated = adapter.rotated_affine_queries(
            module, base, offset, torch.tensor([0.5]), positions, queries.dtype
        )
    torch.testing.assert_close(rotated, queries, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_future_positions_are_those_generate_gives_the_decode_steps(family: str):
    model, processor = tiny(family, "sdpa")
    adapter = get_adapter(model)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"])
    seen: list[torch.Tensor] = []
    hook = adapter.rotary_emb.register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[1] if len(a) > 1 else kw["position_ids"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    finally:
        hook.remove()
    # Rotary embeddings that run once per layer type (Gemma 3) see each step's positions repeatedly.
    steps: list[torch.Tensor] = []
    for positions in seen:
        if not (steps and steps[-1].shape == positions.shape and torch.equal(steps[-1], positions)):
            steps.append(positions)
    batch = inputs["input_ids"].shape[0]
    prompt = adapter.normalize_positions(steps[0], batch)
    decode = torch.cat([adapter.normalize_positions(p, batch) for p in steps[1:]], dim=-1)
    expected = adapter.future_positions(prompt, torch.arange(decode.shape[-1]))
    assert decode.shape[-1] == 3 and torch.equal(decode, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_budget_in_every_kv_layer_and_full_kv_equals_generate(family: str, attn: str):
    model, processor = tiny(family, attn)
    adapter = get_adapter(model)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"])
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with FullKVPress()(model), torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, full)

    if prompt_cache(model, inputs) is None:
        with pytest.raises(UnsupportedCacheError, match="transformers Cache"), SnapKVPress(budget=8)(model):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return
    press = SnapKVPress(budget=8, window_size=4)
    with press(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = prompt_cache(model, inputs)
    kv_layers = {module.layer_idx for module in adapter.attention_modules}
    for idx, layer in enumerate(cache.layers):
        module = next((m for m in adapter.attention_modules if m.layer_idx == idx), None)
        if idx not in kv_layers:
            assert not isinstance(layer, CompressedLayer)
        elif getattr(module, "sliding_window", None):
            assert not isinstance(layer, CompressedLayer)  # sliding layers keep their window
        else:
            expected = torch.tensor(press.stats.prompt_tokens).clamp(max=8)[:, None]
            expected = expected.expand(-1, adapter.n_kv_heads)
            assert isinstance(layer, CompressedLayer) and torch.equal(layer.prompt_lengths, expected)
    assert press.stats.kept.shape[0] == adapter.n_layers
