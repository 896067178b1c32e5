"""KeyDiff: keep the keys least similar to the average key direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mmshiftkv.presses.base import BudgetedPress


def mean_direction(vectors: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the L2-normalised vectors of the real tokens, not re-normalised, float32.

    ``(batch, heads, seq_len, dim)`` -> ``(batch, heads, 1, dim)``; ``key_mask`` ``(batch, seq_len)``
    bool, True for real tokens (None: all real). The anchor of KeyDiff and of MixKV's diversity; its
    squared norm gives a head's mean pairwise cosine similarity
    (:func:`~mmshiftkv.presses.redundancy.mean_pairwise_cosine`).
    """
    normalized = F.normalize(vectors.float(), p=2, dim=-1)
    if key_mask is None:
        return normalized.mean(dim=2, keepdim=True)
    weights = key_mask[:, None, :, None].float()
    return (normalized * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True)


@dataclass(kw_only=True)
class KeyDiffPress(BudgetedPress):
    """One-shot KeyDiff (Park et al., 2025): ``score = -cos(k_t, mean_t' normalize(k_t'))``.

    The anchor is the mean of the L2-normalised keys of the real prompt tokens (padding excluded,
    unlike kvpress's version which averages over every position); the last prompt token is always
    kept by the base class.
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        anchor = mean_direction(keys, self.state.key_mask)
        return -F.cosine_similarity(keys.float(), anchor, dim=-1)
