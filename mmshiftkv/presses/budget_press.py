"""Run any kvpress-style scorer under mmshiftkv budgets, allocators and caches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmshiftkv.presses.base import BudgetedPress


@dataclass(kw_only=True)
class BudgetPress(BudgetedPress):
    """Score with another press (a kvpress ``ScorerPress`` or any scorer), keep by our rules.

    ``BudgetPress(press=KnormPress(), budget=64)`` keeps 64 tokens per KV head ranked by Knorm's
    scores, the last prompt token included, in mmshiftkv's variable-length cache; an allocator can
    be added as for any press. The wrapped press's own ``compression_ratio`` is ignored. kvpress
    scorers are not padding-aware: with a left-padded batch their statistics may include padding
    positions (padding itself is never kept). kvpress's scorers read attention keyword arguments
    (``cache_position``, ...) that transformers >= 5.4 no longer passes: they run on the
    transformers releases kvpress supports.

    Parameters
    ----------
    press : object
        The scorer whose ``score(module, hidden_states, keys, values, attentions, kwargs)`` decides
        which tokens to keep.
    """

    press: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(getattr(self.press, "score", None)):
            raise TypeError(
                "press must be a scorer with a score(module, hidden_states, keys, values, "
                "attentions, kwargs) "
                f"method (e.g. a kvpress ScorerPress), got {type(self.press).__name__}"
            )

    def post_init_from_model(self, model: nn.Module) -> None:
        post_init = getattr(self.press, "post_init_from_model", None)
        if post_init is not None:
            post_init(model)

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
