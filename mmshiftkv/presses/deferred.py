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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import Cache

from mmshiftkv.presses.attention import query_blocks

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
        blocks = query_blocks(state, module, hidden_states, keys, queries)
        with torch.no_grad():
            statistic = allocator.layer_statistic(blocks, key_mask, state.image_mask)
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
