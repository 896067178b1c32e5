"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.validation import check_int


@dataclass(kw_only=True)
class StreamingLLMPress(BudgetedPress):
    """Keep the first ``n_sink`` prompt tokens and the most recent ones (Xiao et al., 2023).

    With a budget ``B`` this keeps ``n_sink`` sinks and a recent window of ``B - n_sink`` tokens, the
    configuration of the MM-ShiftKV paper's App. E. Under left padding the sinks are the first
    real tokens.

    Parameters
    ----------
    n_sink : int, default=4
        Number of initial (real) tokens always kept.
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.n_sink, "n_sink", minimum=0)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        batch, kv_heads, seq_len, _ = keys.shape
        key_mask = self.state.key_mask
        if key_mask is None:
            real_index = torch.arange(seq_len, device=keys.device).expand(batch, -1)
        else:
            real_index = key_mask.long().cumsum(-1) - 1
        # Recency ranks later tokens higher; sinks rank above everything else.
        scores = torch.arange(seq_len, device=keys.device, dtype=torch.float32).expand(batch, -1).clone()
        scores = scores.masked_fill((real_index >= 0) & (real_index < self.n_sink), float(2 * seq_len))
        return scores[:, None, :].expand(-1, kv_heads, -1)
