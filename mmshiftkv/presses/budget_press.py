"""Run any kvpress ``ScorerPress`` under mmshiftkv budgets, allocators and caches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress.presses.scorer_press import ScorerPress
from torch import nn
from transformers import PreTrainedModel

from mmshiftkv.presses.base import BudgetedPress


@dataclass
class BudgetPress(BudgetedPress):
    """Score with a kvpress :class:`~kvpress.presses.scorer_press.ScorerPress`, keep by our rules.

    ``BudgetPress(press=KnormPress(), budget=64)`` keeps 64 tokens per KV head ranked by Knorm's
    scores, the last prompt token included, in mmshiftkv's variable-length cache; an allocator can
    be added as for any press. The wrapped press's own ``compression_ratio`` is ignored. kvpress
    scorers are not padding-aware: with a left-padded batch their statistics may include padding
    positions (padding itself is never kept).

    Parameters
    ----------
    press : ScorerPress
        The kvpress scorer whose ``score`` decides which tokens to keep.
    """

    press: ScorerPress | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.press, ScorerPress):
            raise TypeError(f"press must be a kvpress ScorerPress instance, got {type(self.press).__name__}")

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        self.press.post_init_from_model(model)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        return self.press.score(module, hidden_states, keys, values, attentions, kwargs)
