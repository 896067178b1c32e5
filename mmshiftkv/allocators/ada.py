"""AdaKV allocation (Feng et al., 2024): heads of a layer compete for the layer's budget by score."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmshiftkv.allocators.base import Allocator, budget_after_window, check_window


@dataclass
class AdaAllocator(Allocator):
    """Per layer and sample, split ``kv_heads * (B - W)`` tokens among heads by the press's scores.

    The formula of the reference implementation (FFY0/AdaKV ``AdaptiveSnapKVCluster``, GQA path),
    for a sample with ``n > B`` real tokens, window ``W``, ``B' = B - W`` and ``H`` KV heads:

    1. take the scores of the first ``n - W`` real tokens of every head (the window is kept anyway);
    2. if ``normalize``, scale each head's scores by (sum of its top ``B'``) / (sum of all of them);
    3. take the top ``H * B'`` of all heads' scores together; ``n_h`` = how many fell in head ``h``;
    4. ``floor = int(B' * alpha)``, ``cap_h = round(n_h * (1 - alpha) + floor)`` computed in float32
       with round-half-to-even (as ``torch.round`` does in the reference); head ``h`` keeps
       ``cap_h + W`` tokens.

    ``cap_h <= n - W`` always holds, so no count exceeds ``n``. Scores are ranked in float32, NaN
    as ``-inf``. Equal scores go first to the head where they rank higher (its 1st best before
    another head's 2nd best), then to the lower head index: heads with identical scores split
    evenly (the reference's ``topk`` leaves tie order unspecified). ``normalize`` assumes non-negative
    (attention-like) scores; a head whose ratio is not finite (e.g. all scores zero) is not scaled.

    Total budget: the heads of a layer sum to ``H * B - H * frac(B' * alpha)`` up to the rounding of
    the ``H`` caps (at most ``H / 2`` either way): Uniform's ``H * B`` minus the truncation of
    ``floor``. With ``alpha = 0.2`` and ``B' = 32``, ``floor = 6`` instead of 6.4 and a layer of 4
    heads holds about ``4 * B - 1.6`` tokens.

    Parameters
    ----------
    alpha : float, default=0.2
        Share of ``B'`` every head gets regardless of scores (the reference's ``floor_alpha``; 0.2
        in SparseMM/MM-ShiftKV), in ``[0, 1]``.
    window : int, default=32
        Recent tokens every head keeps on top of its share; the budget must exceed it.
    normalize : bool, default=False
        Rescale each head's scores by its top-``B'`` mass share before the global top-k.
    """

    needs_scores: ClassVar[bool] = True
    alpha: float = 0.2
    window: int = 32
    normalize: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, numbers.Real)
            or not 0 <= self.alpha <= 1
        ):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        check_window(self.window)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")

    def _allocate_sample(
        self, budget: int, layer_idx: int, n: int, scores: torch.Tensor | None
    ) -> torch.Tensor:
        base = budget_after_window(budget, self.window)
        seq_len = scores.shape[-1]
        # Left padding: the real tokens are the last n positions; the last W of them are the window.
        head_scores = scores[:, seq_len - n : seq_len - self.window].float()
        ranked = head_scores.masked_fill(torch.isnan(head_scores), float("-inf"))
        ranked = ranked.sort(dim=-1, descending=True).values
        if self.normalize:
            ratio = ranked[:, :base].sum(-1, keepdim=True) / ranked.sum(-1, keepdim=True)
            ranked = ranked * torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))

        # Rank-major order, so equal scores go to the head where they rank higher, then the lower head.
        pooled = ranked.t().flatten()
        top = torch.sort(pooled, descending=True, stable=True).indices[: self.n_kv_heads * base]
        counts = torch.bincount(top % self.n_kv_heads, minlength=self.n_kv_heads)
        caps = torch.round(counts.float() * (1 - self.alpha) + int(base * self.alpha))
        return caps.long() + self.window
