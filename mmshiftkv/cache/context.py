"""Temporarily route the attention of compressed cache layers to mmshiftkv's attention.

Inside ``with compressed_attention(model):`` the text decoder's config names an attention
implementation ``"mmshiftkv_<original>"`` registered through transformers' public
``AttentionInterface`` / ``AttentionMaskInterface``. Its mask function is the original one, so
masks are unchanged; its attention function looks up the cache layer of the calling module
(found through a forward pre-hook that records ``past_key_values``) and

* reads a :class:`CompressedLayer` with :func:`compressed_sdpa` (or flash-attn's varlen kernel
  when the original implementation is ``flash_attention_2``, flash-attn is importable and the
  tensors are on CUDA);
* hands every other layer, and the prefill that runs before compression, to the original
  implementation unchanged.

The cache is found by type among the attention layer's arguments (transformers 5.24 renamed the
keyword ``past_key_values`` to ``cache``). While the model's forward (or one of its attention
layers) runs, the thread records which model is reading (:mod:`mmshiftkv.cache.reading`), so that a
:class:`CompressedLayer`, and a cache holding one, refuses to be changed by any other model or
outside the context. What is recorded per forward is per thread: two threads may run models inside
their own contexts at once.

Nothing is patched at import; on exit (also after an exception) the configs, hooks and the
registry state of the model are restored. Vision towers keep their own configs untouched.
"""

from __future__ import annotations

import importlib.util
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from mmshiftkv.cache.attention import VarlenFunction, compressed_flash_varlen, compressed_sdpa
from mmshiftkv.cache.compressed_layer import CompressedLayer
from mmshiftkv.cache.reading import READING

ATTENTION_PREFIX = "mmshiftkv_"
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class _ModuleState:
    delegate: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    flash_varlen: VarlenFunction | None


_STATES: weakref.WeakKeyDictionary[nn.Module, _ModuleState] = weakref.WeakKeyDictionary()


def find_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cache | None:
    """The :class:`Cache` among a forward's arguments, whatever its keyword."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def compressed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered as ``mmshiftkv_<original>`` (transformers' signature)."""
    state = _STATES.get(module)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} uses an mmshiftkv attention implementation outside "
            "`compressed_attention(model)`"
        )
    cache = READING.caches.get(module)
    layers = cache.layers if isinstance(cache, Cache) else []
    layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
    if not isinstance(layer, CompressedLayer):
        return state.delegate(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and layer.get_seq_length() > window:
        raise NotImplementedError(
            f"layer {module.layer_idx} attends within a sliding window of {window} tokens and the sequence "
            f"has grown to {layer.get_seq_length()}: decoding past the window over a compressed cache would "
            "not match the model's attention. Keep prompt + generated tokens within the window (or set the "
            "config's sliding_window to None if the model was trained without one)"
        )
    plain_causal = attention_mask is None or (
        attention_mask.ndim == 2 and bool(attention_mask[:, -layer.generated_length :].all())
    )
    if state.flash_varlen is not None and query.is_cuda and dropout == 0.0 and plain_causal:
        return compressed_flash_varlen(layer, query, scaling, state.flash_varlen), None
    return compressed_sdpa(layer, query, attention_mask, scaling, dropout), None


def _enter_attention(model: nn.Module) -> Callable[..., None]:
    def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        READING.caches[module] = find_cache(args, kwargs)
        READING.model = model

    return remember


def _leave_attention(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    READING.model = None
    READING.caches.pop(module, None)


def _enter_forward(model: nn.Module) -> Callable[..., None]:
    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        READING.forwards.append(model)

    return enter


def _leave_forward(model: nn.Module) -> Callable[..., None]:
    def leave(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        # Tolerant: a pre-hook that raised before ours leaves nothing to remove here.
        if READING.forwards and READING.forwards[-1] is model:
            READING.forwards.pop()

    return leave


def _forward_path(model: nn.Module, decoder: nn.Module) -> list[nn.Module]:
    """``model``, the modules between it and ``decoder``, and ``decoder``: whichever a caller runs, the
    decoder's layers run inside its forward."""
    name = next((name for name, module in model.named_modules() if module is decoder), None)
    parts = name.split(".") if name else []
    path = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]
    return path if decoder in path else [*path, decoder]


def _register(original: str) -> str:
    name = ATTENTION_PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, compressed_attention_forward)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _delegate(module: nn.Module, original: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    if original != "eager":
        return ALL_ATTENTION_FUNCTIONS[original]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__} has no module-level eager_attention_forward to delegate to"
        )
    return eager


def _flash_varlen(original: str) -> VarlenFunction | None:
    if original != "flash_attention_2" or importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@contextmanager
def compressed_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Let ``model`` read :class:`CompressedLayer` cache layers, for the duration of the block.

    Layers of the cache that are not compressed, and the prefill, use the model's own attention
    implementation (eager, sdpa, flash_attention_2/3) and mask. Re-entering for a model already
    inside the context is a no-op.

    Parameters
    ----------
    model : torch.nn.Module
        A model :func:`mmshiftkv.models.get_adapter` accepts.

    Yields
    ------
    torch.nn.Module
        ``model``.

    Raises
    ------
    ValueError
        If the decoder uses an attention implementation other than eager, sdpa or flash
        attention 2/3 (e.g. flex or paged attention).
    """
    from mmshiftkv.models.adapter import get_adapter

    adapter = get_adapter(model)
    decoder, modules = adapter.decoder, adapter.attention_modules
    configs = list({id(config): config for config in [decoder.config, *(m.config for m in modules)]}.values())
    # transformers falls back to the module's eager function when no implementation is set.
    original = decoder.config._attn_implementation or "eager"
    if original.startswith(ATTENTION_PREFIX):
        yield model
        return
    if original not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"compressed caches support the attention implementations {SUPPORTED_IMPLEMENTATIONS}, "
            f"the model uses {original!r}"
        )
    name = _register(original)
    flash_varlen = _flash_varlen(original)
    saved = [(config, config._attn_implementation) for config in configs]
    handles = []
    remember = _enter_attention(model)
    READING.contexts += 1
    try:
        for module in _forward_path(model, decoder):
            handles.append(module.register_forward_pre_hook(_enter_forward(model), with_kwargs=True))
            handles.append(
                module.register_forward_hook(_leave_forward(model), with_kwargs=True, always_call=True)
            )
        for module in modules:
            _STATES[module] = _ModuleState(_delegate(module, original), flash_varlen)
            handles.append(module.register_forward_pre_hook(remember, with_kwargs=True))
            handles.append(module.register_forward_hook(_leave_attention, with_kwargs=True, always_call=True))
        for config, _ in saved:
            config._attn_implementation = name
        yield model
    finally:
        for config, implementation in saved:
            config._attn_implementation = implementation
        for handle in handles:
            handle.remove()
        for module in modules:
            _STATES.pop(module, None)
        READING.contexts -= 1
