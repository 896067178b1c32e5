"""Calling a model with a cache the same way on every transformers release (5.2 to 5.24+).

transformers 5.24 renamed the ``past_key_values`` argument and output to ``cache`` and 5.16 changed
``crop(n)`` from "keep n tokens" to "remove -n tokens"; these helpers decide from the model's
signature and the returned objects, never from a version string.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin


@functools.lru_cache(maxsize=64)
def _cache_parameter(forward_type: type, forward_name: str) -> str:
    forward = getattr(forward_type, forward_name)
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: nn.Module, cache: Cache) -> dict[str, Cache]:
    """``{name: cache}`` with the keyword ``model``'s forward (and so ``generate``) takes a cache under."""
    return {_cache_parameter(type(model), "forward"): cache}


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
