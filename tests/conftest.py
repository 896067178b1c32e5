"""Shared pytest fixtures; the tiny models and their inputs are in :mod:`mmshiftkv.testing`."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.cache import cache_argument
from mmshiftkv.testing import (
    FAMILIES,
    QUESTION,
    VISION_FAMILIES,
    kvpress_leftovers_removed,
    make_inputs,
    tiny,
)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=VISION_FAMILIES)
def vision_family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def kvpress_own_hooks_run() -> None:
    """Skip where kvpress's own ``with press(model):`` cannot run: its hook reads the attention keywords
    ``cache_position`` and ``past_key_values``, which transformers 5.4 and 5.24 no longer pass."""
    kvpress = pytest.importorskip("kvpress")
    model, tokenizer = tiny("llama")
    inputs = make_inputs("llama", tokenizer, [QUESTION])
    try:
        press = kvpress.KnormPress(compression_ratio=0.5)
        with torch.no_grad(), kvpress_leftovers_removed(model), press(model):
            model(**inputs, **cache_argument(model, DynamicCache()))
    except KeyError as missing:
        pytest.skip(f"kvpress's own hook reads the attention keyword {missing}, which this release omits")
