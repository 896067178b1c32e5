"""PyramidKV allocation (Cai et al., 2024): more tokens in lower layers, fewer in upper layers."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from mmshiftkv.allocators.base import Allocator, budget_after_window, check_window


@dataclass
class PyramidAllocator(Allocator):
    """Layer budgets decreasing linearly with depth, all KV heads of a layer alike.

    The formula of the reference implementation (KVCache-Factory ``PyramidKVCluster``), with its
    integer floor divisions, for a prompt of ``n`` real tokens, budget ``B``, window ``W``,
    ``B' = B - W`` and ``L`` layers:

    * ``n <= B``: not compressed (every layer keeps ``n``);
    * ``B < n < 2 B'``: every layer keeps ``B`` (the reference's middle branch);
    * otherwise ``min = B' // beta``, ``max = 2 B' - min``; if ``max >= n - W`` then
      ``max = n - W`` and ``min = 2 B' - max``; ``steps = (max - min) // (L - 1)``; layer ``l``
      keeps ``max - l * steps + W``.

    A one-layer model has no pyramid (the reference divides by ``L - 1 = 0``): it keeps ``B``.

    Total budget: ``max - min`` is always even, so in the third case the layers of one KV head
    sum to ``L * B + (L / 2) * ((max - min) mod (L - 1))``: Uniform's ``L * B`` plus what the
    floored ``steps`` leaves in the upper layers (less than ``L * (L - 1) / 2`` tokens). In the
    first two cases the total equals Uniform's exactly.

    Parameters
    ----------
    beta : float, default=20
        Steepness: the top layer gets about ``B' / beta`` tokens besides the window. ``> 0``;
        ``beta = 1`` is flat and ``beta < 1`` gives the upper layers more than the lower ones.
    window : int, default=32
        Recent tokens every layer keeps on top of its pyramid share (the reference's observation
        window); the budget must exceed it.
    """

    beta: float = 20
    window: int = 32

    def __post_init__(self) -> None:
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, numbers.Real)
            or not 0 < self.beta < math.inf
        ):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        check_window(self.window)

    def _allocate_sample(
        self, budget: int, layer_idx: int, n: int, scores: torch.Tensor | None
    ) -> torch.Tensor:
        base = budget_after_window(budget, self.window)
        if n < 2 * base or self.n_layers == 1:
            kept = budget
        else:
            min_num = int(base // self.beta)
            max_num = 2 * base - min_num
            if max_num >= n - self.window:
                max_num = n - self.window
                min_num = 2 * base - max_num
            steps = (max_num - min_num) // (self.n_layers - 1)
            kept = max_num - layer_idx * steps + self.window
        return torch.full((self.n_kv_heads,), kept, dtype=torch.long)
