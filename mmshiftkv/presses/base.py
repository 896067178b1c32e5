"""Budgeted presses: kvpress's press API with absolute per-KV-head budgets and real memory savings.

A press scores every prompt token per (batch, KV head) at the end of prefill; the base class turns
the scores into the kept set (:func:`~mmshiftkv.presses.selection.select_kept_indices`), asks an
optional allocator how many tokens each head keeps, and swaps the layer's cache for a
:class:`~mmshiftkv.cache.CompressedLayer` that really holds only the kept tokens.

The API is kvpress's (``score(module, hidden_states, keys, values, attentions, kwargs)``,
``compression_ratio``, ``with press(model):``) without depending on kvpress, whose releases pin an
old transformers; :mod:`mmshiftkv.interop` connects the two where kvpress is installed.

What the hooks rely on is behaviour, not keyword names: the KV cache is the :class:`Cache` among a
forward's arguments, the prefill is the decoder forward that starts on an empty cache, positions
are what the rotary embedding receives, padding is read off whatever mask the decoder gets (a 2-D
padding mask, a 4-D mask or a dict of them).
"""

from __future__ import annotations

import numbers
import threading
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from mmshiftkv.allocators.base import Allocator
from mmshiftkv.cache import CompressedLayer, compressed_attention, find_cache, make_crop_atomic
from mmshiftkv.cache.attention import visible
from mmshiftkv.models.adapter import ModelAdapter, get_adapter
from mmshiftkv.presses.selection import select_kept_indices
from mmshiftkv.validation import check_real


class CompressionSkippedWarning(UserWarning):
    """A press was asked to compress and left (part of) the cache uncompressed."""


class UnsupportedCacheError(TypeError):
    """The cache ``generate`` (or the caller) uses is not one a press can compress."""


class PressUsageError(RuntimeError):
    """A press was used in a way that would silently give wrong output (refused up front)."""


#: Cache layers a press can replace by a :class:`~mmshiftkv.cache.CompressedLayer`: plain growing
#: layers (sliding-window layers are subclasses and are handled separately). Static layers keep a
#: fixed-size buffer the model's masks are built for, quantized layers hold most tokens in packed
#: form: swapping either silently changes the model's output, so they are refused.
def _compressible(layer: object) -> bool:
    kind = type(layer)
    if isinstance(layer, CompressedLayer):
        return True
    return isinstance(layer, DynamicLayer) and kind.__name__ in {
        "DynamicLayer",
        "DynamicSlidingWindowLayer",
    }


def check_compressible(cache: object, press_name: str) -> None:
    """Raise :class:`UnsupportedCacheError` unless every KV layer of ``cache`` can be compressed."""
    if not isinstance(cache, Cache):
        raise UnsupportedCacheError(f"{press_name} compresses a transformers Cache, not {type(cache)}")
    kv_layers = [layer for layer in cache.layers if isinstance(layer, DynamicLayer | CompressedLayer)]
    others = [layer for layer in cache.layers if not isinstance(layer, DynamicLayer | CompressedLayer)]
    unsupported = sorted({type(layer).__name__ for layer in kv_layers if not _compressible(layer)})
    # Linear-attention state layers of hybrid models hold no KV and are left alone; anything else
    # that is not a dynamic KV layer (static, quantized, offloaded) is refused.
    unsupported += sorted(
        {
            type(layer).__name__
            for layer in others
            if not type(layer).__name__.startswith(("LinearAttention", "Dummy"))
        }
    )
    offloaded = bool(getattr(cache, "offloading", False))
    if unsupported or offloaded:
        what = ", ".join(unsupported) + " layers" if unsupported else "offloaded layers"
        raise UnsupportedCacheError(
            f"{press_name} compresses DynamicCache layers, not {type(cache).__name__} with {what}: leave "
            "cache_implementation unset or pass a DynamicCache() (static, offloaded and quantized caches are "
            "not supported)"
        )


@dataclass
class ScoringState:
    """What a press's :meth:`~BudgetedPress.score` may use besides its arguments.

    Inside ``with press(model):`` the hooks fill it for every prefill. Code that calls ``score``
    directly (a serving engine, kvpress's wrappers, a benchmark) binds one with
    :meth:`BudgetedPress.scoring`.

    Attributes
    ----------
    adapter : ModelAdapter
        The model's adapter (or any object with the same methods).
    key_mask : torch.Tensor or None
        ``(batch, seq_len)`` bool, True for real tokens; None when the prompt has no padding.
    positions : torch.Tensor or None
        The positions the rotary embedding received: ``(batch, seq_len)``, or
        ``(3, batch, seq_len)`` for M-RoPE models.
    visibility : torch.Tensor or None
        ``(batch, rows, seq_len)`` bool: which keys each of the last ``rows`` prompt queries may
        attend to, read off the model's own 4-D mask (image tokens attend bidirectionally in
        Gemma 3); None when the model gave a plain causal/padding mask.
    """

    adapter: ModelAdapter
    key_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    visibility: torch.Tensor | None = None

    def n_tokens(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Real prompt tokens per sample, ``(batch,)`` int64."""
        if self.key_mask is None:
            return torch.full((batch,), seq_len, dtype=torch.long, device=device)
        return self.key_mask.sum(-1).long()


@dataclass
class CompressionStats:
    """What the last prefill under a press kept.

    Attributes
    ----------
    prompt_tokens : list[int]
        Real prompt tokens per sample.
    kept : torch.Tensor
        ``(kv_layers, batch, kv_heads)`` prompt tokens kept per head (layers that hold a KV cache).
    indices : list[torch.Tensor or None]
        Per KV layer, the kept token indices ``(batch, kv_heads, max_kept)`` (row ``(b, h)`` valid up
        to ``kept[layer, b, h]``, ascending), or None for a layer left uncompressed.
    bytes_before, bytes_after : int
        Bytes of the prompt KV cache (keys + values, all layers, the whole batch with its padding)
        before and after compression.
    """

    prompt_tokens: list[int] = field(default_factory=list)
    kept: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    indices: list[torch.Tensor | None] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compressed(self) -> bool:
        return self.bytes_after < self.bytes_before


# The model each active press is entered on, to refuse a second press on the same model.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, BudgetedPress] = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


@dataclass
class _Forward:
    """What the decoder pre-hook learns about one forward, before its layers run."""

    cache: Cache | None
    #: True: the forward starts on an empty cache; False: it continues one (or has none); None: no
    #: cache was given and the decoder may build one (settled by the first attention layer).
    prefill: bool | None
    state: ScoringState
    checked_length: bool = False


@dataclass(kw_only=True)
class BudgetedPress:
    """Base class of every mmshiftkv press.

    Subclasses implement :meth:`score`. A press compresses once, at the end of the prefill, and keeps
    per (layer, KV head) the last prompt token plus the best-scored others, in temporal order.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        kvpress-style fraction of the prompt to drop, in ``[0, 1)``. Exclusive with ``budget``.
    budget : int, optional
        Prompt tokens kept per KV head after prefill, the last prompt token included
        (``budget=64`` keeps the last token plus the top 63 by score). Prompts not longer than the
        budget stay uncompressed.
    allocator : Allocator, optional
        Decides how many tokens each (layer, KV head) keeps around the mean ``budget``
        (PyramidKV, AdaKV, SparseMM, ...). Requires ``budget``. Default: ``budget`` everywhere.
    """

    compression_ratio: float = 0.0
    budget: int | None = None
    allocator: Allocator | None = None

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or (
            self.budget is not None and not isinstance(self.budget, numbers.Integral)
        ):
            raise TypeError(f"budget must be an int (tokens per KV head), got {self.budget!r}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1 token per KV head, got {self.budget}")
        check_real(self.compression_ratio, "compression_ratio")
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.budget is not None and self.compression_ratio > 0:
            raise ValueError("give either budget or compression_ratio, not both")
        if self.allocator is not None and self.budget is None:
            raise ValueError(f"{type(self.allocator).__name__} allocates a budget: pass budget=... as well")
        if self.allocator is not None and not isinstance(self.allocator, Allocator):
            raise TypeError(f"allocator must be an mmshiftkv Allocator, got {type(self.allocator).__name__}")
        self.stats = CompressionStats()
        self._state: ScoringState | None = None
        self._model: nn.Module | None = None

    # ------------------------------------------------------------ press API
    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """Importance of every prompt token, ``(batch, kv_heads, seq_len)``; higher is kept first.

        Parameters
        ----------
        module : nn.Module
            The attention layer.
        hidden_states : torch.Tensor
            Its input (after the layer's input norm), ``(batch, seq_len, hidden)``.
        keys, values : torch.Tensor
            The prompt's cached keys (rotated) and values, ``(batch, kv_heads, seq_len, head_dim)``.
        attentions : torch.Tensor or None
            The layer's attention weights when the model returned them.
        kwargs : dict
            The attention layer's keyword arguments.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def post_init_from_model(self, model: nn.Module) -> None:
        """Hook for presses that need the model before the first forward (kvpress API)."""

    @property
    def asks_compression(self) -> bool:
        """Whether this press was configured to drop anything at all."""
        return self.budget is not None or self.compression_ratio > 0

    @property
    def state(self) -> ScoringState:
        """The current prefill's state; valid inside ``with press(model)`` or :meth:`scoring`."""
        if self._state is None:
            raise RuntimeError(
                f"{type(self).__name__}.score needs a ScoringState: use it inside `with press(model):` or "
                "`with press.scoring(ScoringState(...)):`"
            )
        return self._state

    @contextmanager
    def scoring(self, state: ScoringState) -> Generator[BudgetedPress, None, None]:
        """Bind ``state`` so that :meth:`score` can be called outside ``with press(model):``."""
        previous, self._state = self._state, state
        try:
            yield self
        finally:
            self._state = previous

    # ---------------------------------------------------------- compression
    def kept_counts(self, layer: int, n_tokens: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """Tokens to keep per (sample, KV head) in KV layer ``layer``, ``(batch, kv_heads)`` int64."""
        kv_heads = self.state.adapter.n_kv_heads
        if self.allocator is not None:
            return self.allocator.allocate(self.budget, layer, n_tokens, scores)
        if self.budget is not None:
            counts = n_tokens.clamp(max=self.budget)
        else:
            counts = (n_tokens * (1 - self.compression_ratio)).long().clamp(min=1)
        return counts[:, None].expand(-1, kv_heads)

    def compress_layer(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        cache: Cache,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> None:
        """Score, select and replace ``cache.layers[module.layer_idx]`` by the kept tokens."""
        adapter = self.state.adapter
        layer_idx = module.layer_idx
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        batch, _, seq_len, _ = keys.shape
        if getattr(module, "sliding_window", None) or seq_len < hidden_states.shape[1]:
            # Sliding-window layers keep their own window (at most `sliding_window` tokens): decoding
            # past the window over a compressed layer would not match the model's semantics.
            held = keys.nbytes + values.nbytes
            n_tokens = self.state.n_tokens(batch, hidden_states.shape[1], keys.device)
            kept = n_tokens.clamp(max=seq_len)[:, None].expand(-1, adapter.n_kv_heads)
            self._record(adapter.ordinal(module), n_tokens, kept, None, held, held)
            return
        n_tokens = self.state.n_tokens(batch, seq_len, keys.device)
        ordinal = adapter.ordinal(module)
        before = keys.nbytes + values.nbytes
        if not self.asks_compression:
            self._record(ordinal, n_tokens, None, None, before, before)
            return
        adapter.verify_rotation(module, hidden_states, keys, self.state.positions)
        scores = None
        if self.allocator is not None and self.allocator.needs_scores:
            scores = self.masked_scores(module, hidden_states, keys, values, attentions, kwargs)
        counts = self.kept_counts(ordinal, n_tokens, scores)
        if bool((counts >= n_tokens[:, None]).all()):
            self._record(ordinal, n_tokens, counts, None, before, before)
            return
        if scores is None:
            scores = self.masked_scores(module, hidden_states, keys, values, attentions, kwargs)
        indices, lengths = select_kept_indices(scores, counts, self.state.key_mask)
        compressed = CompressedLayer.from_selection(keys, values, indices, lengths, reader=self._model)
        cache.layers[layer_idx] = compressed
        make_crop_atomic(cache)
        self._record(ordinal, n_tokens, lengths, indices, before, compressed.nbytes)

    def masked_scores(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """:meth:`score` with padding at ``-inf``, shape ``(batch, kv_heads, seq_len)``.

        Raises
        ------
        ValueError
            If a real token's score is NaN: the attention input held NaN/inf, and any selection
            made from it would be arbitrary.
        """
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        if scores.shape != keys.shape[:3]:
            raise RuntimeError(
                f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, "
                f"expected (batch, kv_heads, seq_len) = {tuple(keys.shape[:3])}"
            )
        key_mask = self.state.key_mask
        nan = torch.isnan(scores)
        if key_mask is not None:
            nan = nan & key_mask[:, None, :]
        if bool(nan.any()):
            raise ValueError(
                f"{type(self).__name__}: layer {module.layer_idx} scored NaN for real prompt tokens (the "
                "attention input or the cache holds NaN/inf); refusing to keep an arbitrary subset"
            )
        if key_mask is not None:
            scores = scores.float().masked_fill(~key_mask[:, None, :], float("-inf"))
        return scores

    def _record(
        self,
        ordinal: int,
        n_tokens: torch.Tensor,
        kept: torch.Tensor | None,
        indices: torch.Tensor | None,
        before: int,
        after: int,
    ) -> None:
        adapter = self.state.adapter
        if ordinal == 0:
            self.stats = CompressionStats(
                prompt_tokens=n_tokens.tolist(),
                kept=torch.zeros(adapter.n_layers, n_tokens.shape[0], adapter.n_kv_heads, dtype=torch.long),
                indices=[None] * adapter.n_layers,
            )
        if kept is None:
            kept = n_tokens[:, None].expand(-1, adapter.n_kv_heads)
        self.stats.kept[ordinal] = kept.cpu()
        self.stats.indices[ordinal] = None if indices is None else indices.cpu()
        self.stats.bytes_before += before
        self.stats.bytes_after += after
        if ordinal == adapter.n_layers - 1 and self.asks_compression and not self.stats.compressed:
            warnings.warn(
                f"{type(self).__name__}: the prompt ({max(self.stats.prompt_tokens)} tokens) is not longer "
                f"than the budget ({self.budget if self.budget is not None else self.compression_ratio}); "
                "the KV cache was left uncompressed.",
                CompressionSkippedWarning,
                stacklevel=2,
            )

    # ---------------------------------------------------------------- hooks
    def _decoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = find_cache(args, kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        # No cache given: the decoder may build one itself (``model(..., use_cache=True)``); the first
        # attention layer tells (see ``_attention_hook``).
        prefill = None if cache is None else past == 0
        mask = kwargs.get("attention_mask") if prefill is not False else None
        if cache is None and self.asks_compression:
            misplaced = [
                name
                for name, value in kwargs.items()
                if ("cache" in name or "past_key" in name)
                and value is not None
                and not isinstance(value, bool | torch.Tensor)
            ]
            if misplaced:
                raise UnsupportedCacheError(
                    f"{type(self).__name__} compresses a transformers Cache, not the "
                    f"{type(kwargs[misplaced[0]])} "
                    f"given as {misplaced[0]}= (legacy tuple caches are not supported: pass DynamicCache())"
                )
        self._forward = _Forward(
            cache=cache,
            prefill=prefill,
            state=ScoringState(
                adapter=self._adapter, key_mask=padding_mask(mask), visibility=last_rows(mask)
            ),
        )
        if prefill and self.asks_compression:
            self._check_prefill(cache, kwargs)

    def _check_prefill(self, cache: Cache, kwargs: dict) -> None:
        check_compressible(cache, type(self).__name__)
        config = self._adapter.text_config
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            raise PressUsageError(
                f"{type(self).__name__}: output_attentions=True under a compressing press would return "
                "attentions without the evicted tokens (or none at all where mmshiftkv's attention reads a "
                "compressed layer); run the analysis without a press"
            )

    def _cache_built_inside(self, forward: _Forward, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Settle a forward that got no cache: did the decoder build one, holding just this forward?"""
        cache = find_cache(args, kwargs)
        hidden_states = _attention_input(args, kwargs, self._adapter.text_config.hidden_size)
        layer = cache.layers[module.layer_idx] if cache is not None else None
        forward.prefill = layer is not None and layer.get_seq_length() == hidden_states.shape[1]
        if forward.prefill:
            forward.cache = cache
            if self.asks_compression:
                self._check_prefill(cache, kwargs)
        elif cache is None and self.asks_compression:
            warnings.warn(
                f"{type(self).__name__}: a forward ran without a KV cache (use_cache=False?); nothing to "
                "compress in it",
                CompressionSkippedWarning,
                stacklevel=3,
            )

    def _decoder_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Refuse a cache the decoder built or used that is not a transformers ``Cache``."""
        forward = self._forward
        if forward is None or forward.cache is not None or not self.asks_compression:
            return
        values = output.values() if hasattr(output, "values") else ()
        plain = torch.Tensor | tuple | list | dict | Cache
        foreign = [v for v in values if v is not None and not isinstance(v, plain)]
        if foreign:
            raise UnsupportedCacheError(
                f"{type(self).__name__} compresses a transformers Cache; {type(module).__name__} used a "
                f"{type(foreign[0]).__name__} (a model-specific cache class of this transformers "
                "release), so "
                "nothing could be compressed. Use a transformers release where this model uses DynamicCache"
            )

    def _rotary_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        forward = getattr(self, "_forward", None)
        if forward is None or forward.prefill is False:
            return
        values = [*args, *kwargs.values()]
        like = next(v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())
        positions = next(v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point())
        forward.state.positions = self._adapter.normalize_positions(positions, like.shape[0])

    def _attention_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        forward = getattr(self, "_forward", None)
        if forward is not None and forward.prefill is None:
            self._cache_built_inside(forward, module, args, kwargs)
        if forward is None or not forward.prefill:
            return output
        hidden_states = _attention_input(args, kwargs, self._adapter.text_config.hidden_size)
        self._check_prompt_length(forward, hidden_states.shape[1])
        if forward.state.positions is None:
            raise PressUsageError(
                f"{type(self).__name__}: the decoder's rotary embedding was not called before layer "
                f"{module.layer_idx}; cannot know the prompt positions"
            )
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if module is self._adapter.attention_modules[0]:
            self._prefills_seen += 1
            if self.asks_compression and forward.state.key_mask is not None:
                check_left_padding(forward.state.key_mask, type(self).__name__)
        with self.scoring(forward.state):
            self.compress_layer(module, hidden_states, forward.cache, attentions, kwargs)
        return output

    def _check_prompt_length(self, forward: _Forward, length: int) -> None:
        """Inside ``generate``: the prefill forward must hold exactly the prompt."""
        expected = self._generate_prompt_length
        if forward.checked_length or expected is None:
            return
        forward.checked_length = True
        if length < expected:
            raise PressUsageError(
                f"{type(self).__name__}: generate prefilled {length} of the prompt's {expected} "
                "tokens in its first "
                "forward (chunked prefill, prefill_chunk_size=...). A press scores the whole prompt at once: "
                "remove prefill_chunk_size"
            )
        if length > expected:
            raise PressUsageError(
                f"{type(self).__name__}: generate's first forward holds {length} tokens for a "
                f"{expected}-token "
                "prompt: assisted / speculative decoding (assistant_model=, "
                "prompt_lookup_num_tokens=) verifies "
                "candidate tokens in the prefill, which a press would compress as prompt. Not supported: "
                "generate without an assistant under a press"
            )

    def _guarded_generate(self, generate: Callable) -> Callable:
        def generate_under_press(*args, **kwargs):
            prompt = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if prompt is None:
                prompt = kwargs.get("inputs_embeds")
            self._generate_prompt_length = None if prompt is None else int(prompt.shape[1])
            try:
                return generate(*args, **kwargs)
            finally:
                self._generate_prompt_length = None

        return generate_under_press

    @contextmanager
    def __call__(self, model: nn.Module) -> Generator:
        """Apply the press to ``model`` for the duration of the ``with`` block.

        Registers hooks on the decoder, its rotary embedding and its KV-holding attention layers,
        and routes attention over compressed layers to :mod:`mmshiftkv.cache`; everything is
        removed on exit, also when the block raises.

        Raises
        ------
        UnsupportedModelError
            If the model's structure cannot be compressed (the message names the missing part).
        PressUsageError
            If this press is already active (one press object compresses one model at a time), or
            another press is already active on ``model``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}(...) is applied to a model: `with press(model):`, got "
                f"{type(model).__name__}"
            )
        adapter = get_adapter(model)
        with _ACTIVE_LOCK:
            if self._model is not None:
                raise PressUsageError(
                    f"this {type(self).__name__} is already active on a {type(self._model).__name__}; "
                    "one press "
                    "object compresses one model at a time (create another press for a second model, "
                    "and do not "
                    "nest a press inside itself)"
                )
            other = _ACTIVE.get(model)
            if other is not None:
                raise PressUsageError(
                    f"{type(model).__name__} already runs under a {type(other).__name__}; presses do "
                    "not nest. "
                    "Exit the first `with` before entering another press"
                )
            _ACTIVE[model] = self
            self._model = model
        self._adapter = adapter
        self._forward: _Forward | None = None
        self._prefills_seen = 0
        self._generate_prompt_length: int | None = None
        hooks: list = []
        try:
            if self.allocator is not None:
                self.allocator.bind(adapter.n_layers, adapter.n_heads, adapter.n_kv_heads)
            self.post_init_from_model(model)
            decoder = adapter.decoder
            hooks.append(decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
            hooks.append(decoder.register_forward_hook(self._decoder_hook, with_kwargs=True))
            hooks.append(
                adapter.rotary_emb.register_forward_pre_hook(self._rotary_pre_hook, with_kwargs=True)
            )
            hooks += [
                m.register_forward_hook(self._attention_hook, with_kwargs=True)
                for m in adapter.attention_modules
            ]
            own_generate = vars(model).get("generate")
            if hasattr(model, "generate"):
                # An instance attribute, removed on exit: generate's prompt length tells a chunked or
                # assisted prefill (which a press cannot compress correctly) from a whole-prompt one.
                model.generate = self._guarded_generate(model.generate)
            try:
                with compressed_attention(model):
                    yield
            finally:
                if own_generate is not None:
                    model.generate = own_generate
                elif "generate" in vars(model):
                    del model.generate
        finally:
            for hook in hooks:
                hook.remove()
            self._forward = None
            with _ACTIVE_LOCK:
                _ACTIVE.pop(model, None)
                self._model = None
        if self.asks_compression and self._prefills_seen == 0:
            warnings.warn(
                f"{type(self).__name__}: no prefill ran inside the press context, nothing was compressed.",
                CompressionSkippedWarning,
                stacklevel=3,
            )


def _attention_input(args: tuple, kwargs: dict, hidden_size: int) -> torch.Tensor:
    """The attention layer's input hidden states, found by shape rather than by keyword."""
    candidates: Iterable[Any] = [*args, kwargs.get("hidden_states"), *kwargs.values()]
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[-1] == hidden_size:
            return value
    raise PressUsageError(
        f"cannot find the attention input (a (batch, seq_len, {hidden_size}) tensor) among the "
        "attention layer's "
        "arguments"
    )


def padding_mask(mask: object) -> torch.Tensor | None:
    """``(batch, kv_len)`` bool of real keys from the mask a decoder receives, or None without padding.

    The decoder may receive a 2-D padding mask, a 4-D mask (boolean, True = visible, or additive,
    0 = visible), or a dict of those per layer type (transformers >= 5.2 pre-builds them in
    ``generate``; Gemma 3 always does). Keys the last query of the widest mask may not see are
    padding (under left padding the last token is real and sees every real key; a sliding-window
    mask, narrower, says nothing about padding).
    """
    real = _last_row_visibility(mask)
    return None if real is None or bool(real.all()) else real


def _last_row_visibility(mask: object) -> torch.Tensor | None:
    if isinstance(mask, dict):
        return _widest(_last_row_visibility(value) for value in mask.values())
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.ndim == 2:
        return mask.bool()
    if mask.ndim == 4:
        # At prefill the keys are the queries; further columns are empty slots of a static cache.
        return visible(mask[:, 0, -1, : mask.shape[2]])
    return None


def _widest(found: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """Of several layer types' visibilities, the one that lets the most keys be seen."""
    candidates = [m for m in found if m is not None]
    return max(candidates, key=lambda m: int(m.sum())) if candidates else None


#: Prompt queries whose visibility rows a press may need (SnapKV's default window is 32).
VISIBILITY_ROWS = 64


def last_rows(mask: object, rows: int = VISIBILITY_ROWS) -> torch.Tensor | None:
    """``(batch, rows, kv_len)`` bool visibility of the last query rows of the widest 4-D mask, or None.

    Only masks that are not plain causal matter (bidirectional image blocks); a 2-D padding mask or
    no mask means causal attention, which the presses apply themselves.
    """
    if isinstance(mask, dict):
        return _widest(last_rows(value, rows) for value in mask.values())
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        return None
    seen = visible(mask[:, 0, -rows:, : mask.shape[2]])
    q_len, kv_len = seen.shape[1], seen.shape[2]
    query_index = torch.arange(kv_len - q_len, kv_len, device=seen.device)
    beyond_causal = torch.arange(kv_len, device=seen.device)[None, :] > query_index[:, None]
    return seen if bool((seen & beyond_causal).any()) else None


def check_left_padding(key_mask: torch.Tensor, press_name: str) -> None:
    """Refuse right-padded prompts: their last token is padding and would be kept as the prompt's last."""
    if not bool(key_mask[:, -1].all()):
        raise PressUsageError(
            f"{press_name}: a sample of the batch ends in padding (right padding). Presses need left "
            "padding: "
            "set tokenizer.padding_side = 'left' (or processor.tokenizer.padding_side = 'left')"
        )
    if not bool(key_mask.any(-1).all()):
        raise PressUsageError(f"{press_name}: a sample of the batch has no real token")
