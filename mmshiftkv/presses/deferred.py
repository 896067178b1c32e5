"""Whole-model allocation: every layer scored during the prefill, allocated and compressed after it.

Allocators with ``needs_all_layers`` (:class:`~mmshiftkv.allocators.layer_budgets.LayerBudgetAllocator`:
MEDA, VL-Cache) give a layer its budget from statistics of every layer. Under one, a press's
:meth:`~mmshiftkv.presses.base.BudgetedPress.compress_layer` keeps, per layer, the press's scores
``(batch, kv_heads, seq_len)`` float32 (4 bytes per token and KV head: 1/128 of the layer's bf16
keys and values at head_dim 128) and the allocator's statistic ``(batch,)``, computed at the
layer's attention from its queries in bounded blocks
(:func:`~mmshiftkv.presses.attention.query_blocks`). When the decoder's forward returns,
:meth:`~mmshiftkv.presses.base.BudgetedPress.finish_prefill` asks the allocator for every layer's
counts at once and selects and compresses the layers with the rule every press uses.

The cost: the full prompt cache of every layer is held until the end of the prefill forward (as
without a press) instead of each layer shrinking right after its attention; afterwards the cache
holds exactly what the per-layer path would.

Under a chunked prefill the layers are deferred at the forward of the last chunk (with the chunked
prompt's state), and the statistic's sums over its queries are gathered chunk by chunk
(:func:`accumulate_layer_sums`: each query's attention over the keys so far is complete in its
chunk); queries that only the complete prompt designates (VL-Cache's fallback window) are read from
the trailing rows kept across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import Cache

from mmshiftkv.presses.attention import query_blocks
from mmshiftkv.presses.errors import PressUsageError

if TYPE_CHECKING:
    from mmshiftkv.presses.base import BudgetedPress


@dataclass
class _ScoredLayer:
    layer_idx: int
    ordinal: int
    n_tokens: torch.Tensor
    scores: torch.Tensor
    statistic: torch.Tensor


@dataclass
class DeferredLayers:
    """One prefill's layers, waiting for the allocator to see all of them."""

    #: Layers the press leaves as they are (sliding-window layers): their :meth:`_record` arguments.
    kept_whole: dict[int, tuple] = field(default_factory=dict)
    scored: list[_ScoredLayer] = field(default_factory=list)

    def add(
        self,
        press: BudgetedPress,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
        whole: tuple | None,
    ) -> None:
        """Score one layer and compute the allocator's statistic of it (or note that it stays whole)."""
        state = press.state
        ordinal = state.adapter.ordinal(module)
        if whole is not None:
            self.kept_whole[ordinal] = whole
            return
        batch, _, seq_len, _ = keys.shape
        state.adapter.verify_rotation(module, hidden_states, keys, state.positions)
        key_mask = state.real_tokens(batch, seq_len, keys.device)
        allocator = press.allocator
        queries = allocator.statistic_queries(key_mask, state.image_mask)
        chunks = None if state.allocator_statistics is None else state.allocator_statistics[module.layer_idx]
        with torch.no_grad():
            if chunks is None:
                blocks = query_blocks(state, module, hidden_states, keys, queries)
                statistic = allocator.layer_statistic(blocks, key_mask, state.image_mask)
            else:
                statistic = chunks.statistic(press, module, hidden_states, keys, queries)
            scores = press.masked_scores(module, hidden_states, keys, values, attentions, kwargs)
        n_tokens = state.n_tokens(batch, seq_len, keys.device)
        self.scored.append(_ScoredLayer(module.layer_idx, ordinal, n_tokens, scores, statistic))

    def finish(self, press: BudgetedPress, cache: Cache | None) -> None:
        """Allocate every scored layer at once, compress them and record all layers in order."""
        records = dict(self.kept_whole)
        statistics = None
        if self.scored:
            statistics = torch.stack([layer.statistic.double().cpu() for layer in self.scored])
            n_tokens = self.scored[0].n_tokens
            counts = press.allocator.allocate_layers(press.budget, n_tokens, statistics)
            for layer, count in zip(self.scored, counts):
                if bool((count >= layer.n_tokens[:, None]).all()):
                    held = cache.layers[layer.layer_idx]
                    size = held.keys.nbytes + held.values.nbytes
                    records[layer.ordinal] = (layer.ordinal, layer.n_tokens, count, None, size, size)
                else:
                    records[layer.ordinal] = press._replace_layer(
                        cache, layer.layer_idx, layer.ordinal, layer.n_tokens, count, layer.scores
                    )
        for ordinal in sorted(records):
            press._record(*records[ordinal])
        if statistics is not None:
            shape = (press.state.adapter.n_layers, statistics.shape[1])
            table = torch.full(shape, float("nan"), dtype=torch.float64)
            table[[layer.ordinal for layer in self.scored]] = statistics
            press.stats.layer_statistics = table


@dataclass
class LayerSums:
    """A whole-model allocator's sums over one layer's queries so far in a chunked prefill.

    Per request and KV layer: 2 float64, 1 int64 and 1 bool per sample.

    Attributes
    ----------
    numerator, denominator : torch.Tensor
        ``(batch,)`` float64, :meth:`~mmshiftkv.allocators.layer_budgets.LayerBudgetAllocator.layer_sums`
        over the queries since the last restart.
    count : torch.Tensor
        ``(batch,)`` int64, those queries.
    seen_image : torch.Tensor
        ``(batch,)`` bool, whether an image token has arrived.
    """

    numerator: torch.Tensor
    denominator: torch.Tensor
    count: torch.Tensor
    seen_image: torch.Tensor

    def statistic(
        self,
        press: BudgetedPress,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        queries: torch.Tensor,
    ) -> torch.Tensor:
        """The layer's statistic ``(batch,)`` float64 for the whole prompt's ``queries`` ``(batch, seq_len)``.

        Where the chunks gathered exactly those queries (as many), their sums; elsewhere (a prompt
        without post-vision tokens: VL-Cache's fallback window) the sums over ``queries`` computed from
        the trailing rows ``hidden_states``, which must hold them all.
        """
        state, allocator = press.state, press.allocator
        seq_len = keys.shape[2]
        past = seq_len - hidden_states.shape[1]
        gathered = self.count.to(queries.device) == queries.sum(-1)
        rest = queries & ~gathered[:, None]
        if bool(rest[:, :past].any()):
            raise RuntimeError(
                f"{type(allocator).__name__} reads queries before the {hidden_states.shape[1]} rows kept "
                "across chunks (its prefill_rows is too small)"
            )
        numerator, denominator = self.numerator, self.denominator
        if bool(rest.any()):
            blocks = query_blocks(state, module, hidden_states, keys, rest[:, past:], past=past)
            rest_numerator, rest_denominator = allocator.layer_sums(
                blocks, state.real_tokens(*queries.shape, keys.device)
            )
            numerator = torch.where(gathered.cpu(), numerator, rest_numerator)
            denominator = torch.where(gathered.cpu(), denominator, rest_denominator)
        return numerator / denominator.clamp(min=1)


def accumulate_layer_sums(
    press: BudgetedPress,
    module: nn.Module,
    hidden_states: torch.Tensor,
    real: torch.Tensor,
    keys: torch.Tensor | None,
    previous: LayerSums | None,
) -> LayerSums:
    """Fold one chunk of ``module``'s layer into the whole-model allocator's sums (``press.state``: chunk).

    The chunk's queries (:meth:`~mmshiftkv.allocators.layer_budgets.LayerBudgetAllocator.chunk_queries`)
    against the keys so far, ``hidden_states`` ``(batch, n_tokens, hidden)``, ``real`` ``(batch,
    n_tokens)`` bool, ``keys`` ``(batch, kv_heads, keys so far, head_dim)``.
    """
    state, allocator = press.state, press.allocator
    if keys is None:
        raise PressUsageError(
            f"{type(allocator).__name__} sums each chunk's attention over the keys so far, "
            "which this chunked prefill did not provide"
        )
    seen_image = None if previous is None else previous.seen_image
    queries, restart, seen_image = allocator.chunk_queries(real, state.image_mask, seen_image)
    past = keys.shape[2] - real.shape[1]
    key_mask = state.real_tokens(real.shape[0], keys.shape[2], keys.device)
    blocks = query_blocks(state, module, hidden_states, keys, queries, past=past)
    with torch.no_grad():
        numerator, denominator = allocator.layer_sums(blocks, key_mask)
    count = queries.sum(-1).cpu()
    if previous is not None:
        carried = ~restart.cpu()
        numerator = numerator + previous.numerator * carried
        denominator = denominator + previous.denominator * carried
        count = count + previous.count * carried
    return LayerSums(numerator, denominator, count, seen_image)
