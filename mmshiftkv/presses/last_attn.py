"""LastAttn: the attention of the last prompt query only (the paper's ablation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmshiftkv.presses.attention import last_query_attention
from mmshiftkv.presses.base import BudgetedPress


@dataclass(kw_only=True)
class LastAttnPress(BudgetedPress):
    """Rank prompt tokens by the attention the last prompt token pays them.

    This is MM-ShiftKV without query proxies (Table 5, "w/o sampling"): the score of token ``t`` on
    KV head ``h`` is the softmax attention of the last prompt query, averaged over the query heads
    of ``h``, computed with the model's own RoPE / M-RoPE positions.
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    @property
    def prefill_rows(self) -> int:
        """The last prompt token's attention input (its query)."""
        return 1

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        return last_query_attention(self.state, module, hidden_states, keys)
