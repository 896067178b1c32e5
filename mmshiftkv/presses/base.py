"""Budgeted presses: kvpress's press API with absolute per-KV-head budgets and real memory savings.

A press scores every prompt token per (batch, KV head) at the end of prefill; the base class turns
the scores into the kept set (:func:`~mmshiftkv.presses.selection.select_kept_indices`), asks an
optional allocator how many tokens each head keeps, and swaps the layer's cache for a
:class:`~mmshiftkv.cache.CompressedLayer` that really holds only the kept tokens.

The API is kvpress's (``score(module, hidden_states, keys, values, attentions, kwargs)``,
``compression_ratio``, ``with press(model):``) without depending on kvpress, whose releases pin an
old transformers; :mod:`mmshiftkv.interop` connects the two where kvpress is installed. What happens
inside ``with press(model):`` (the hooks, the generate guard, one press per model) is
:mod:`mmshiftkv.presses.session`.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Cache

from mmshiftkv.allocators.base import Allocator
from mmshiftkv.cache import CompressedLayer, guard_cache
from mmshiftkv.presses.deferred import DeferredLayers
from mmshiftkv.presses.errors import CompressionSkippedWarning, PressUsageError
from mmshiftkv.presses.selection import select_kept_indices
from mmshiftkv.presses.session import PressSession
from mmshiftkv.presses.state import CompressionStats, ScoringState
from mmshiftkv.validation import check_real


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
        #: The ``with press(model):`` block this press is in, if any.
        self._session: PressSession | None = None
        #: The prefill's layers waiting for a whole-model allocation (``allocator.needs_all_layers``).
        self._deferred: DeferredLayers | None = None

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

    # ------------------------------------------------------ chunked prefill
    #: Why the press cannot score a prompt that arrives in chunks, or None where it can: what it reads
    #: of the attention input is then declared by :attr:`prefill_rows` and :meth:`accumulate_chunk`.
    chunked_prefill_refusal: ClassVar[str | None] = (
        "its score may read more of the prefill forward than a chunk holds, and it declares no chunked "
        "prefill support (prefill_rows / accumulate_chunk)"
    )

    def chunked_prefill_reason(self) -> str | None:
        """Why this press, with its allocator, cannot score a chunked prefill; None where it can."""
        allocator = self.allocator
        if self.chunked_prefill_refusal is None and allocator is not None and allocator.needs_all_layers:
            reason = allocator.chunked_prefill_refusal()
            return None if reason is None else f"{type(allocator).__name__} {reason}"
        return self.chunked_prefill_refusal

    @property
    def prefill_rows(self) -> int | None:
        """Trailing attention-input rows :meth:`score` reads as ``hidden_states`` (None: every row).

        Under a chunked prefill (:mod:`mmshiftkv.presses.chunked`) only these rows of each layer are
        kept across chunks and given to :meth:`score`; what a press needs of the other rows it gathers
        in :meth:`accumulate_chunk`. Default 0: the keys in the cache suffice.
        """
        return 0

    def accumulate_chunk(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        real: torch.Tensor,
        keys: torch.Tensor | None,
        previous: Any,
    ) -> Any:
        """Fold one prefill chunk of ``module``'s layer into what :meth:`score` needs of the whole prompt.

        Called once per chunk and KV layer, with :attr:`state` bound to the chunk (its positions, and its
        padding over the keys so far); :meth:`score` finds the result at the end of the prompt as
        ``self.state.accumulated(module)``. Default: nothing (None).

        Parameters
        ----------
        hidden_states : torch.Tensor
            The chunk's attention input, ``(batch, n_tokens, hidden)``.
        real : torch.Tensor
            ``(batch, n_tokens)`` bool, True for the chunk's real tokens.
        keys : torch.Tensor or None
            The layer's keys so far, ``(batch, kv_heads, keys, head_dim)`` (None where unavailable).
        previous : object
            What this method returned for the layer's previous chunk (None for the first).
        """
        return None

    def expect_prompt(self, prompt_length: int) -> None:
        """Announce that the next prefill spans ``prompt_length`` tokens per row and may come in chunks.

        Inside ``with press(model):``, forwards over one cache that together hold ``prompt_length``
        tokens per row (padding included) are one prompt: each chunk is folded in as it passes and the
        cache is compressed at the end of the forward that completes the prompt, exactly as a
        one-forward prefill would be. Without it a forward on an empty cache is the whole prompt (what
        ``model.generate`` announces itself, ``prefill_chunk_size`` or not). The announcement holds for
        one prompt.

        Raises
        ------
        PressUsageError
            Outside ``with press(model):``, or while a chunked prefill is under way.
        """
        if self._session is None:
            raise PressUsageError(
                f"{type(self).__name__}.expect_prompt is called inside `with press(model):`, "
                "before the prefill"
            )
        self._session.expect_prompt(prompt_length)

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
        """Score, select and replace ``cache.layers[module.layer_idx]`` by the kept tokens.

        Under an allocator that needs every layer (``allocator.needs_all_layers``: MEDA, VL-Cache) the
        layer is only scored here; :meth:`finish_prefill` allocates and compresses all layers once the
        prefill forward is done.
        """
        adapter = self.state.adapter
        layer_idx = module.layer_idx
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        batch, _, seq_len, _ = keys.shape
        ordinal = adapter.ordinal(module)
        whole = self._kept_whole(module, hidden_states, keys, values)
        if self.allocator is not None and self.allocator.needs_all_layers:
            if ordinal == 0 or self._deferred is None:
                self._deferred = DeferredLayers()
            self._deferred.add(self, module, hidden_states, keys, values, attentions, kwargs, whole)
            return
        if whole is not None:
            self._record(*whole)
            return
        n_tokens = self.state.n_tokens(batch, seq_len, keys.device)
        before = keys.nbytes + values.nbytes
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
        self._record(*self._replace_layer(cache, layer_idx, ordinal, n_tokens, counts, scores))

    def finish_prefill(self, cache: Cache | None) -> None:
        """End of a prefill forward: allocate and compress the layers :meth:`compress_layer` deferred."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred.finish(self, cache)

    def _kept_whole(
        self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple | None:
        """:meth:`_record` arguments of a layer this press leaves as it is, or None if it compresses it."""
        adapter = self.state.adapter
        batch, _, seq_len, _ = keys.shape
        held = keys.nbytes + values.nbytes
        # A chunked prefill hands only the prompt's last rows as hidden_states.
        prompt_length = self.state.prompt_length or hidden_states.shape[1]
        if getattr(module, "sliding_window", None) or seq_len < prompt_length:
            # Sliding-window layers keep their own window (at most `sliding_window` tokens): decoding
            # past the window over a compressed layer would not match the model's semantics.
            n_tokens = self.state.n_tokens(batch, prompt_length, keys.device)
            kept = n_tokens.clamp(max=seq_len)[:, None].expand(-1, adapter.n_kv_heads)
            return adapter.ordinal(module), n_tokens, kept, None, held, held
        if not self.asks_compression:
            n_tokens = self.state.n_tokens(batch, seq_len, keys.device)
            return adapter.ordinal(module), n_tokens, None, None, held, held
        return None

    def _replace_layer(
        self,
        cache: Cache,
        layer_idx: int,
        ordinal: int,
        n_tokens: torch.Tensor,
        counts: torch.Tensor,
        scores: torch.Tensor,
    ) -> tuple:
        """Replace ``cache.layers[layer_idx]`` by its ``counts`` best-scored tokens; returns :meth:`_record`'s
        arguments."""
        layer = cache.layers[layer_idx]
        before = layer.keys.nbytes + layer.values.nbytes
        indices, lengths = self.select(scores, counts)
        compressed = self.kept_layer(layer.keys, layer.values, indices, lengths, scores)
        cache.layers[layer_idx] = compressed
        guard_cache(cache)
        return ordinal, n_tokens, lengths, indices, before, compressed.nbytes

    def select(self, scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens of one layer from its masked scores and counts, ``(indices, lengths)``.

        Default: :func:`~mmshiftkv.presses.selection.select_kept_indices`. A press whose ranking is not
        one score per token (LOOK-M's priority classes) overrides this, returning the same format.
        """
        return select_kept_indices(scores, counts, self.state.key_mask)

    def merge(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        scores: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fold the evicted tokens into the kept ones before the layer is stored; None: keep them as cached.

        Parameters
        ----------
        keys, values : torch.Tensor
            The layer's prefill cache, ``(batch, kv_heads, seq_len, head_dim)``.
        indices, lengths : torch.Tensor
            The selection of :meth:`select`; the evicted tokens are the other real tokens.
        scores : torch.Tensor
            The masked scores, ``(batch, kv_heads, seq_len)``.

        Returns
        -------
        tuple of torch.Tensor or None
            Kept keys and values ``(batch, kv_heads, max_kept, head_dim)``, slot ``k`` of row ``(b, h)``
            standing for token ``indices[b, h, k]`` (:func:`mmshiftkv.presses.merge.merge_evicted`).
        """
        return None

    def kept_layer(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        scores: torch.Tensor,
    ) -> CompressedLayer:
        """The :class:`CompressedLayer` holding a selection, merged first when the press merges."""
        reader = self._session.model if self._session is not None else None
        merged = self.merge(keys, values, indices, lengths, scores)
        if merged is None:
            return CompressedLayer.from_selection(keys, values, indices, lengths, reader=reader)
        slots = torch.arange(indices.shape[2], device=indices.device).expand_as(indices).contiguous()
        kept_keys, kept_values = merged
        return CompressedLayer.from_selection(
            kept_keys, kept_values, slots, lengths, seq_len=keys.shape[2], reader=reader
        )

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

    @contextmanager
    def __call__(self, model: nn.Module) -> Generator:
        """Apply the press to ``model`` for the duration of the ``with`` block.

        Registers hooks on the decoder, its rotary embedding and its KV-holding attention layers,
        and routes attention over compressed layers to :mod:`mmshiftkv.cache`; everything is
        removed on exit, also when the block raises (:class:`~mmshiftkv.presses.session.PressSession`).

        Raises
        ------
        UnsupportedModelError
            If the model's structure cannot be compressed (the message names the missing part).
        PressUsageError
            If this press is already active (one press object compresses one model at a time), or
            another press is already active on ``model``.
        """
        session = PressSession(self, model)
        with session.applied():
            yield
        session.warn_if_nothing_compressed()
