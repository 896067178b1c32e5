"""SparseMM allocation (Wang et al., 2025): budgets from offline visual-head scores."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from mmshiftkv.allocators.base import Allocator, budget_after_window, check_window
from mmshiftkv.allocators.head_scores import (
    HeadScoreSource,
    check_head_score_shape,
    head_score_table,
    load_head_scores,
)


@dataclass
class SparseMMAllocator(Allocator):
    """Per-(layer, KV head) budgets proportional to visual-head scores, over the whole model.

    The formula of the reference implementation (CR400AF-A/SparseMM ``SparseMM`` cluster), for
    ``L`` layers, ``H_kv`` KV heads, window ``W`` and ``B' = B - W``:

    1. each query head's score is the mean of its list, divided by the sum over all ``L x H``
       query heads; a KV head's score ``s`` is the sum over its consecutive query heads (GQA);
    2. ``min = int(B' * ratio)``, ``remain = (B' - min) * L * H_kv``;
    3. ``cap = round(s * remain + min)`` in float64, round-half-to-even;
    4. a sample with ``n > B`` real tokens keeps ``min(cap, n - W) + W`` tokens per head.

    Total budget: the scores sum to 1, so before the ``n - W`` clip the caps of all layers and
    heads sum to ``L * H_kv * B`` (Uniform's total) up to the rounding of each cap (at most
    ``L * H_kv / 2`` tokens either way). Single layers do not each sum to ``H_kv * B``: layers
    with more visual heads get more. The ``n - W`` clip only lowers the total (short prompts).

    Parameters
    ----------
    head_scores : str, os.PathLike or Mapping
        A SparseMM head-score JSON file (``"layer-head"`` -> list of floats, query heads) or the
        loaded mapping; see :mod:`mmshiftkv.allocators.head_scores`. Its shape must match the model
        the press is applied to (checked in :meth:`bind`), and not all scores may be zero.
    ratio : float, default=0.1
        Share of ``B'`` every head gets regardless of its score, in ``[0, 1]`` (``1``: every head keeps
        ``B``, as in the reference).
    window : int, default=32
        Recent tokens every head keeps on top of its share; the budget must exceed it.
    """

    head_scores: HeadScoreSource
    ratio: float = 0.1
    window: int = 32
    _table: torch.Tensor = field(init=False, repr=False, compare=False)
    _kv_scores: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.ratio, bool)
            or not isinstance(self.ratio, numbers.Real)
            or not 0 <= self.ratio <= 1
        ):
            raise ValueError(f"ratio must be a number in [0, 1], got {self.ratio!r}")
        check_window(self.window)
        self._table = head_score_table(load_head_scores(self.head_scores))
        total = float(self._table.sum())
        if not math.isfinite(total):
            raise ValueError(
                f"head scores sum to {total} in float64 (largest mean {float(self._table.max())!r}): "
                "they cannot be normalised; rescale them (only their ratios matter)"
            )
        if not total > 0:
            raise ValueError(
                "head scores are all zero: they cannot split a budget (calibrate on more images)"
            )

    def bind(self, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
        """Check the head scores against the model shape and sum them per KV head."""
        check_head_score_shape(self._table, n_layers, n_heads)
        super().bind(n_layers, n_heads, n_kv_heads)
        normalized = self._table / self._table.sum()
        self._kv_scores = normalized.view(self.n_layers, self.n_kv_heads, -1).sum(-1)

    def _allocate_sample(
        self, budget: int, layer_idx: int, n: int, scores: torch.Tensor | None
    ) -> torch.Tensor:
        base = budget_after_window(budget, self.window)
        min_cache = int(base * self.ratio)
        remain = (base - min_cache) * self.n_layers * self.n_kv_heads
        caps = torch.round(self._kv_scores[layer_idx] * remain + min_cache).long()
        return caps.clamp(max=n - self.window) + self.window
