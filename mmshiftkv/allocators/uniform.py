"""Uniform allocation: the same budget for every layer and KV head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmshiftkv.allocators.base import Allocator


@dataclass
class UniformAllocator(Allocator):
    """Every (layer, KV head) keeps ``min(B, n)`` tokens.

    The reference point of the other allocators: its total over a sample's layers and heads is
    ``n_layers * n_kv_heads * min(B, n)``.
    """

    def _allocate_sample(
        self, budget: int, layer_idx: int, n: int, scores: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.full((self.n_kv_heads,), budget, dtype=torch.long)
