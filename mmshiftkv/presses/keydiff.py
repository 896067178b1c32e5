"""KeyDiff: keep the keys least similar to the average key direction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mmshiftkv.presses.base import BudgetedPress


@dataclass(kw_only=True)
class KeyDiffPress(BudgetedPress):
    """One-shot KeyDiff (Park et al., 2025): ``score = -cos(k_t, mean_t' normalize(k_t'))``.

    The anchor is the mean of the L2-normalised keys of the real prompt tokens (padding excluded,
    unlike kvpress's version which averages over every position); the last prompt token is always
    kept by the base class.
    """

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        normalized = F.normalize(keys.float(), p=2, dim=-1)
        key_mask = self.state.key_mask
        if key_mask is None:
            anchor = normalized.mean(dim=2, keepdim=True)
        else:
            weights = key_mask[:, None, :, None].float()
            anchor = (normalized * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True)
        return -F.cosine_similarity(keys.float(), anchor, dim=-1)
