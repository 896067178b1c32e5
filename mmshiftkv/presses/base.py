"""Budgeted presses: kvpress ``ScorerPress`` semantics with absolute per-KV-head budgets.

A press scores every prompt token per (batch, KV head) at the end of prefill; the base class turns
the scores into the kept set (:func:`~mmshiftkv.presses.selection.select_kept_indices`), asks an
optional allocator how many tokens each head keeps, and swaps the layer's cache for a
:class:`~mmshiftkv.cache.CompressedLayer` that really holds only the kept tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress.presses.base_press import is_prefilling
from kvpress.presses.scorer_press import ScorerPress
from torch import nn
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from mmshiftkv.allocators.base import Allocator
from mmshiftkv.cache import CompressedLayer, compressed_attention
from mmshiftkv.models.adapter import ModelAdapter, get_adapter
from mmshiftkv.presses.selection import select_kept_indices


class CompressionSkippedWarning(UserWarning):
    """A press was asked to compress and left (part of) the cache uncompressed."""


class UnsupportedCacheError(TypeError):
    """The cache ``generate`` (or the caller) uses is not one a press can compress."""


#: Cache layers a press can replace by a :class:`~mmshiftkv.cache.CompressedLayer`. Static layers
#: keep a fixed-size buffer the model's masks are built for, quantized layers hold most tokens in
#: packed form: swapping either silently changes the model's output, so they are refused.
COMPRESSIBLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, CompressedLayer)


def check_compressible(cache: object, press_name: str) -> None:
    """Raise :class:`UnsupportedCacheError` unless every layer of ``cache`` can be compressed."""
    if not isinstance(cache, Cache):
        raise UnsupportedCacheError(f"{press_name} compresses a transformers Cache, not {type(cache)}")
    layer_types = {type(layer) for layer in cache.layers}
    unsupported = sorted(kind.__name__ for kind in layer_types if kind not in COMPRESSIBLE_LAYERS)
    offloaded = bool(getattr(cache, "offloading", False))
    if unsupported or offloaded:
        what = ", ".join(unsupported) + " layers" if unsupported else "offloaded layers"
        raise UnsupportedCacheError(
            f"{press_name} compresses DynamicCache layers, not {type(cache).__name__} with {what}: leave "
            "cache_implementation unset or pass past_key_values=DynamicCache() (static, offloaded and "
            "quantized caches are not supported)"
        )


@dataclass
class PrefillState:
    """What the hooks learn about the current forward before the attention layers run.

    Attributes
    ----------
    adapter : ModelAdapter
        The model's adapter.
    key_mask : torch.Tensor or None
        ``(batch, seq_len)`` bool, True for real tokens; None when the prompt has no padding.
    positions : torch.Tensor or None
        The positions the rotary embedding received: ``(batch, seq_len)``, or
        ``(3, batch, seq_len)`` for M-RoPE models.
    """

    adapter: ModelAdapter
    key_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None

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
        ``(layers, batch, kv_heads)`` prompt tokens kept per head.
    indices : list[torch.Tensor or None]
        Per layer, the kept token indices ``(batch, kv_heads, max_kept)`` (row ``(b, h)`` valid up to
        ``kept[layer, b, h]``, ascending), or None for a layer left uncompressed.
    bytes_before, bytes_after : int
        Bytes of the prompt KV cache (keys + values, all layers) before and after compression.
    """

    prompt_tokens: list[int] = field(default_factory=list)
    kept: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    indices: list[torch.Tensor | None] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compressed(self) -> bool:
        return self.bytes_after < self.bytes_before


@dataclass
class BudgetedPress(ScorerPress):
    """Base class of every mmshiftkv press.

    Subclasses implement :meth:`score`. A press compresses once, at the end of prefill, and keeps
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
        if isinstance(self.budget, bool) or (self.budget is not None and not isinstance(self.budget, int)):
            raise TypeError(f"budget must be an int (tokens per KV head), got {self.budget!r}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1 token per KV head, got {self.budget}")
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.budget is not None and self.compression_ratio > 0:
            raise ValueError("give either budget or compression_ratio, not both")
        if self.allocator is not None and self.budget is None:
            raise ValueError(f"{type(self.allocator).__name__} allocates a budget: pass budget=... as well")
        if self.allocator is not None and not isinstance(self.allocator, Allocator):
            raise TypeError(f"allocator must be an mmshiftkv Allocator, got {type(self.allocator).__name__}")
        self.stats = CompressionStats()
        self._state: PrefillState | None = None

    @property
    def asks_compression(self) -> bool:
        """Whether this press was configured to drop anything at all."""
        return self.budget is not None or self.compression_ratio > 0

    @property
    def state(self) -> PrefillState:
        """The current prefill's state; only valid inside ``with press(model)``."""
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__} is used outside of `with press(model):`")
        return self._state

    def kept_counts(
        self, layer_idx: int, n_tokens: torch.Tensor, scores: torch.Tensor | None
    ) -> torch.Tensor:
        """Tokens to keep per (sample, KV head) in one layer, ``(batch, kv_heads)`` int64."""
        kv_heads = self.state.adapter.n_kv_heads
        if self.allocator is not None:
            return self.allocator.allocate(self.budget, layer_idx, n_tokens, scores)
        if self.budget is not None:
            counts = n_tokens.clamp(max=self.budget)
        else:
            counts = (n_tokens * (1 - self.compression_ratio)).long().clamp(min=1)
        return counts[:, None].expand(-1, kv_heads)

    def compress_layer(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        cache,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> None:
        """Score, select and replace ``cache.layers[module.layer_idx]`` by the kept tokens."""
        layer_idx = module.layer_idx
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        batch, _, seq_len, _ = keys.shape
        if seq_len < hidden_states.shape[1]:
            # A sliding-window layer already dropped the prompt's oldest tokens.
            raise NotImplementedError(
                f"{type(self).__name__}: layer {layer_idx} keeps a sliding window of {seq_len} tokens, "
                f"shorter than the {hidden_states.shape[1]}-token prompt; compressing past a sliding window "
                "is not supported (use a prompt within the window, or a model without sliding windows)"
            )
        n_tokens = self.state.n_tokens(batch, seq_len, keys.device)
        needs_scores_first = self.allocator is not None and self.allocator.needs_scores

        scores = None
        if needs_scores_first:
            scores = self.masked_scores(module, hidden_states, keys, values, attentions, kwargs)
        counts = self.kept_counts(layer_idx, n_tokens, scores)
        before = keys.nbytes + values.nbytes
        if bool((counts >= n_tokens[:, None]).all()):
            self._record(layer_idx, n_tokens, counts, None, before, before)
            return
        if scores is None:
            scores = self.masked_scores(module, hidden_states, keys, values, attentions, kwargs)
        indices, lengths = select_kept_indices(scores, counts, self.state.key_mask)
        compressed = CompressedLayer.from_selection(keys, values, indices, lengths)
        cache.layers[layer_idx] = compressed
        self._record(layer_idx, n_tokens, lengths, indices, before, compressed.nbytes)

    def masked_scores(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """:meth:`score` with padding at ``-inf``, shape ``(batch, kv_heads, seq_len)``."""
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        if scores.shape != keys.shape[:3]:
            raise RuntimeError(
                f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, "
                f"expected (batch, kv_heads, seq_len) = {tuple(keys.shape[:3])}"
            )
        if self.state.key_mask is not None:
            scores = scores.float().masked_fill(~self.state.key_mask[:, None, :], float("-inf"))
        return scores

    def _record(
        self,
        layer_idx: int,
        n_tokens: torch.Tensor,
        kept: torch.Tensor,
        indices: torch.Tensor | None,
        before: int,
        after: int,
    ) -> None:
        if layer_idx == 0:
            n_layers = self.state.adapter.n_layers
            self.stats = CompressionStats(
                prompt_tokens=n_tokens.tolist(),
                kept=torch.zeros(n_layers, *kept.shape, dtype=torch.long),
                indices=[None] * n_layers,
            )
        self.stats.kept[layer_idx] = kept.cpu()
        self.stats.indices[layer_idx] = None if indices is None else indices.cpu()
        self.stats.bytes_before += before
        self.stats.bytes_after += after
        if (
            layer_idx == self.state.adapter.n_layers - 1
            and self.asks_compression
            and not self.stats.compressed
        ):
            warnings.warn(
                f"{type(self).__name__}: the prompt ({max(self.stats.prompt_tokens)} tokens) is not longer "
                f"than the budget ({self.budget if self.budget is not None else self.compression_ratio}); "
                "the KV cache was left uncompressed.",
                CompressionSkippedWarning,
                stacklevel=2,
            )

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        """Compress the layer's cache at the end of the prefill forward (not during decoding)."""
        hidden_states = kwargs["hidden_states"]
        cache = kwargs.get("past_key_values")
        if cache is None or not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        self._prefills_seen += module.layer_idx == 0
        self.compress_layer(module, hidden_states, cache, output[1], kwargs)
        return output

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None and self.asks_compression:
            check_compressible(cache, type(self).__name__)
        mask = kwargs.get("attention_mask")
        padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all())
        self.state.key_mask = mask.bool() if padded else None
        self.state.positions = None

    def _capture_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        like = args[0] if args else kwargs["x"]
        positions = args[1] if len(args) > 1 else kwargs["position_ids"]
        self.state.positions = self.state.adapter.normalize_positions(positions, like.shape[0])

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        """Apply the press to ``model`` for the duration of the ``with`` block.

        Registers hooks on the decoder and its attention layers and routes attention over
        compressed layers to :mod:`mmshiftkv.cache`; everything is removed on exit, also when the
        block raises.

        Raises
        ------
        UnsupportedModelError
            If ``model`` is not of a supported family.
        """
        adapter = get_adapter(model)
        if self.allocator is not None:
            self.allocator.bind(adapter.n_layers, adapter.n_heads, adapter.n_kv_heads)
        self.post_init_from_model(model)
        self._state = PrefillState(adapter=adapter)
        self._prefills_seen = 0
        decoder = adapter.language_model
        hooks = [
            decoder.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            decoder.rotary_emb.register_forward_pre_hook(self._capture_positions, with_kwargs=True),
        ]
        hooks += [
            m.register_forward_hook(self.forward_hook, with_kwargs=True) for m in adapter.attention_modules
        ]
        try:
            with compressed_attention(model):
                yield
        finally:
            for hook in hooks:
                hook.remove()
            self._state = None
        if self.asks_compression and self._prefills_seen == 0:
            warnings.warn(
                f"{type(self).__name__}: no prefill ran inside the press context, nothing was compressed.",
                CompressionSkippedWarning,
                stacklevel=3,
            )
