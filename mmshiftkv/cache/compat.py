"""Calling a model with a cache the same way on every transformers release (5.2 to 5.24+).

transformers 5.24 renamed the ``past_key_values`` argument and output to ``cache`` and 5.16 changed
``crop(n)`` from "keep n tokens" to "remove -n tokens"; these helpers decide from the model's
signature and the returned objects, never from a version string. Hybrid models' caches differ too:
Qwen3.5 keeps its linear-attention state in transformers' ``DynamicCache`` from 5.24 on, in its own
class before; :func:`prompt_cache_argument` builds the cache the model would build.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin


@functools.lru_cache(maxsize=64)
def _cache_parameter(forward_type: type, forward_name: str) -> str:
    forward = getattr(forward_type, forward_name)
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: nn.Module, cache: Cache) -> dict[str, Cache]:
    """``{name: cache}`` with the keyword ``model``'s forward (and so ``generate``) takes a cache under."""
    return {_cache_parameter(type(model), "forward"): cache}


def prompt_cache_argument(model: nn.Module) -> dict[str, Cache]:
    """An empty cache for a prefill of ``model``, as the keyword argument its forward and ``generate`` take.

    ``DynamicCache(config=...)`` with the decoder's config, as ``generate`` builds it (sliding-window
    and linear-attention layers where the config has them), passed explicitly so that a checkpoint's
    ``generation_config.cache_implementation`` ("static", "hybrid") does not replace it. Where this
    transformers' ``DynamicCache`` would hold a KV layer for a decoder layer that has no KV attention
    (Qwen3.5 on transformers 5.2, which keeps that state in its own cache class), ``{}``: the model
    builds its own cache.
    """
    from mmshiftkv.models.adapter import UnsupportedModelError, get_adapter

    config = model.config.get_text_config(decoder=True)
    cache = DynamicCache(config=config)
    try:
        adapter = get_adapter(model)
    except UnsupportedModelError:
        return cache_argument(model, cache)
    with_kv = {module.layer_idx for module in adapter.attention_modules}
    misplaced = [
        index
        for index, layer in enumerate(cache.layers)
        if index not in with_kv and type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer")
    ]
    return {} if misplaced else cache_argument(model, cache)


def returned_cache(outputs: Any) -> Cache | None:
    """The :class:`Cache` a forward returned (``outputs.cache`` or ``outputs.past_key_values``)."""
    values = outputs.values() if hasattr(outputs, "values") else ()
    return next((value for value in values if isinstance(value, Cache)), None)


def crop_to(cache: Cache | CacheLayerMixin, length: int) -> None:
    """Cut a cache (or one cache layer) back to ``length`` tokens.

    The crop is given as a negative count of tokens to remove, which means the same on every release.
    """
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
