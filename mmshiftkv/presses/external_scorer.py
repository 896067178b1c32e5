"""Run any kvpress-style scorer under mmshiftkv budgets, allocators and caches."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmshiftkv.presses.base import BudgetedPress


@dataclass(kw_only=True)
class ExternalScorerPress(BudgetedPress):
    """Score with another press (a kvpress ``ScorerPress`` or any scorer), keep by our rules.

    ``ExternalScorerPress(press=KnormPress(), budget=64)`` keeps 64 tokens per KV head ranked by Knorm's
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
                "press must be a scorer "
                "with a score(module, hidden_states, keys, values, attentions, kwargs) method "
                f"(e.g. a kvpress ScorerPress), got {type(self.press).__name__}"
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


@dataclass(kw_only=True)
class BudgetPress(ExternalScorerPress):
    """Deprecated name of :class:`ExternalScorerPress` (it wraps an external scorer); removed in 0.2."""

    def __post_init__(self) -> None:
        warnings.warn(
            "BudgetPress is renamed ExternalScorerPress (it wraps an external scorer such as a kvpress "
            "ScorerPress); the old name will be removed in mmshiftkv 0.2",
            DeprecationWarning,
            stacklevel=3,
        )
        super().__post_init__()
