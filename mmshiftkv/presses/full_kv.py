"""FullKV: the uncompressed baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmshiftkv.presses.base import BudgetedPress


@dataclass(kw_only=True)
class FullKVPress(BudgetedPress):
    """Keep every prompt token (the paper's "Full KV" row).

    It still runs inside the press machinery, so :attr:`stats` reports the prompt and cache size,
    but it never scores nor drops anything; generation is identical to running without a press.
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.asks_compression or self.allocator is not None:
            raise ValueError("FullKVPress keeps the whole cache: it takes no budget, ratio or allocator")

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        return torch.zeros(keys.shape[:3], device=keys.device)
