"""Tiny random-weight models of every supported family, built offline from configs.

They use the real transformers model, processor and image-processor classes with a byte-level
tokenizer built in code (:func:`mmshiftkv.tokenization.build_tokenizer`), so tests, benchmarks and
scripts run without downloading anything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from mmshiftkv.cache import cache_argument
from mmshiftkv.testing.classic_models import llava, qwen_vl, text_decoder
from mmshiftkv.testing.newer_models import (
    gemma3,
    glm4v,
    idefics3,
    internvl,
    llava_onevision,
    mistral3,
    qwen3_5,
    qwen3_vl,
)
from mmshiftkv.testing.refused_models import fuyu, llama4, mllama

_BUILDERS: dict[str, Callable[[str, str], tuple[PreTrainedModel, Any]]] = {
    "qwen2.5-vl": qwen_vl,
    "qwen2-vl": qwen_vl,
    "llava-next": llava,
    "llava": llava,
    "llama": text_decoder,
    "qwen2": text_decoder,
    "qwen3": text_decoder,
    "mistral": text_decoder,
    "llava-onevision": llava_onevision,
    "internvl": internvl,
    "mistral3": mistral3,
    "idefics3": idefics3,
    "smolvlm": idefics3,
    "qwen3-vl": qwen3_vl,
    "qwen3-vl-moe": qwen3_vl,
    "glm4v": glm4v,
    "gemma3": gemma3,
    "gemma3-text": gemma3,
    "qwen3.5": qwen3_5,
    "qwen3.5-text": qwen3_5,
    "mllama": mllama,
    "llama4": llama4,
    "fuyu": fuyu,
}


def build_tiny_model(
    family: str, attn_implementation: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """A tiny random-weight model of ``family`` and its processor (tokenizer for text models and fuyu).

    Every decoder has 2-4 layers, 4 query heads sharing 2 KV heads, fp32 weights, eval mode; the
    processors carry a chat template that places the image (and video) tokens.

    Parameters
    ----------
    family : str
        One of :data:`ALL_FAMILIES` or :data:`REFUSED_FAMILIES`.
    attn_implementation : str, default="sdpa"
        ``"sdpa"`` or ``"eager"``.
    seed : int, default=0
        Seed of the random weights (the global RNG state is restored afterwards).
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(_BUILDERS)}")
    builder = _BUILDERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builder(family, attn_implementation)
    return model.to(dtype).eval(), processor


@functools.cache
def tiny(family: str, attn: str = "sdpa") -> tuple[PreTrainedModel, Any]:
    """:func:`build_tiny_model` with the default seed and dtype, built once per process and shared.

    Callers must not change the returned model (its weights, config or generation config).
    """
    return build_tiny_model(family, attn_implementation=attn)


@contextmanager
def kvpress_leftovers_removed(model: nn.Module) -> Generator[None, None, None]:
    """Remove on exit the ``rotary_emb`` that kvpress's ``with press(model):`` attaches to every
    attention module and never removes, so that a shared :func:`tiny` model stays as built."""
    attentions = [module for name, module in model.named_modules() if name.endswith("self_attn")]
    had = [hasattr(attention, "rotary_emb") for attention in attentions]
    try:
        yield
    finally:
        for attention, present in zip(attentions, had, strict=True):
            if not present and hasattr(attention, "rotary_emb"):
                del attention.rotary_emb


#: Factor by which :func:`tiny_sharpened` multiplies the attention scaling of the ``i``-th KV layer.
SHARPENING = 200.0


@functools.cache
def tiny_sharpened(
    family: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """A tiny model whose KV layers attend ever more sharply: layer ``i``'s scaling times ``SHARPENING ** i``.

    The random-weight models attend almost uniformly in every layer, so allocators that share the
    budget by the layers' attention entropy or sparsity (MEDA, VL-Cache) would split it evenly; here
    the layers differ strongly. Built once per process (its own weights, not :func:`tiny`'s); callers
    must not change it.
    """
    from mmshiftkv.models import get_adapter

    model, processor = build_tiny_model(family, attn_implementation=attn, dtype=dtype)
    for i, module in enumerate(get_adapter(model).attention_modules):
        module.scaling = module.scaling * SHARPENING**i
    return model, processor


def capture_attention_calls(model: nn.Module, inputs: dict) -> tuple[list[dict], DynamicCache]:
    """A plain prefill of ``inputs`` and, per KV attention layer in order, what the model handed it.

    Returns
    -------
    tuple
        A list of dicts (``module``, ``hidden_states`` ``(batch, seq_len, hidden)``, ``attentions``
        (the layer's attention weights, None unless eager), ``kwargs``), and the prefill's cache.
    """
    from mmshiftkv.models import get_adapter

    calls: list[dict] = []

    def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden_states = kwargs["hidden_states"]
        calls.append(dict(module=module, hidden_states=hidden_states, attentions=output[1], kwargs=kwargs))

    attentions = get_adapter(model).attention_modules
    hooks = [attention.register_forward_hook(record, with_kwargs=True) for attention in attentions]
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(**inputs, **cache_argument(model, cache))
    finally:
        for hook in hooks:
            hook.remove()
    return calls, cache
