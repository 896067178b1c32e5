"""SnapKV: attention of an observation window of recent prompt queries, pooled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mmshiftkv.presses.attention import mean_over_query_groups, prompt_query_attention
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.validation import check_int, check_pooling_kernel


@dataclass(kw_only=True)
class SnapKVPress(BudgetedPress):
    """SnapKV (Li et al., 2024) as configured in the MM-ShiftKV paper's App. E.

    The last ``window_size`` prompt queries attend to the prompt; the attention each earlier token
    receives is averaged over the window, smoothed by 1-D average pooling, averaged over the query
    heads of a KV head, and the window itself is always kept (its most recent tokens first when the
    budget is smaller than the window). Unlike kvpress's SnapKV, queries are rotated with the
    model's own positions, so Qwen2-VL / Qwen2.5-VL M-RoPE is handled, and padding is excluded.

    Parameters
    ----------
    window_size : int, default=32
        Observation window (recent prompt queries).
    kernel_size : int, default=5
        Average-pooling kernel (odd).
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    window_size: int = 32
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.window_size, "window_size", minimum=1)
        check_pooling_kernel(self.kernel_size)

    @property
    def prefill_rows(self) -> int:
        """The observation window's attention inputs (its queries)."""
        return self.window_size

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        state = self.state
        batch, kv_heads, seq_len, _ = keys.shape
        # A decoding press (kvpress's DecodingPress, through to_kvpress) hands only recent hidden states.
        window = min(self.window_size, seq_len, hidden_states.shape[1])
        probs, query_valid = prompt_query_attention(
            state.adapter,
            module,
            hidden_states,
            keys,
            state.positions,
            state.key_mask,
            n_queries=window,
            visibility=state.visibility,
        )
        weights = query_valid.float() / query_valid.float().sum(-1, keepdim=True).clamp(min=1)
        observed = torch.einsum("bhqt,bq->bht", probs[..., : seq_len - window], weights)
        if observed.shape[-1] > 0:
            pooled = F.avg_pool1d(observed, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        else:
            pooled = observed
        prefix = mean_over_query_groups(pooled, kv_heads)
        # Window tokens outrank every prefix token (pooled attention is <= 1), later ones first.
        recency = 2.0 + torch.arange(window, device=keys.device, dtype=torch.float32) / window
        return torch.cat([prefix, recency.expand(batch, kv_heads, -1)], dim=-1)
