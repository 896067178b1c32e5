"""Use mmshiftkv presses where kvpress expects a press (its wrappers, its pipeline).

kvpress's wrappers (``AdaKVPress``, ``ComposedPress``, ``ChunkPress``, ``KeyRerotationPress``, ...)
accept ``ScorerPress`` instances and call their ``score()`` from their own hooks, then keep tokens
with kvpress's rules and plain ``DynamicLayer`` caches. :func:`to_kvpress` turns any mmshiftkv
press into such a scorer: its ``score()`` builds the :class:`~mmshiftkv.presses.base.ScoringState`
the press needs from the attention layer's own arguments (positions from ``position_ids``, else
``0..seq_len-1``; no padding, as kvpress assumes), on the model kvpress's ``__call__`` announced
through ``post_init_from_model``.

Requires the ``kvpress`` extra (``pip install 'mmshiftkv[kvpress]'``); kvpress itself supports only
the transformers releases its metadata names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvpress.presses.scorer_press import ScorerPress
from torch import nn

from mmshiftkv.models.adapter import ModelAdapter, get_adapter
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.state import ScoringState


@dataclass
class KVPressScorer(ScorerPress):
    """A kvpress ``ScorerPress`` whose scores are an mmshiftkv press's (see :func:`to_kvpress`).

    Parameters
    ----------
    press : BudgetedPress
        The mmshiftkv press whose :meth:`~BudgetedPress.score` ranks the tokens.
    compression_ratio : float
        kvpress's fraction of the prompt to drop.
    """

    press: BudgetedPress | None = None
    compression_ratio: float = 0.0
    _adapter: ModelAdapter | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.press, BudgetedPress):
            raise TypeError(f"press must be an mmshiftkv press, got {type(self.press).__name__}")
        super().__post_init__()

    def post_init_from_model(self, model: nn.Module) -> None:
        self._adapter = get_adapter(model)
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
        if self._adapter is None:
            raise RuntimeError(
                "KVPressScorer.score ran before post_init_from_model(model): use `with press(model):`"
            )
        batch, _, seq_len, _ = keys.shape
        positions = kwargs.get("position_ids")
        if not isinstance(positions, torch.Tensor) or positions.shape[-1] != seq_len:
            positions = torch.arange(seq_len, device=keys.device)[None]
        state = ScoringState(
            adapter=self._adapter, positions=self._adapter.normalize_positions(positions, batch)
        )
        with self.press.scoring(state):
            return self.press.score(module, hidden_states, keys, values, attentions, kwargs)


def to_kvpress(press: BudgetedPress, compression_ratio: float | None = None) -> KVPressScorer:
    """A kvpress ``ScorerPress`` scoring like ``press``.

    Parameters
    ----------
    press : BudgetedPress
        Any mmshiftkv press (its budget and allocator are not used: kvpress keeps tokens).
    compression_ratio : float, optional
        Default: the press's own ``compression_ratio``.

    Examples
    --------
    >>> from kvpress import AdaKVPress
    >>> ada = AdaKVPress(press=to_kvpress(ShiftKVPress(), compression_ratio=0.5))
    """
    ratio = press.compression_ratio if compression_ratio is None else compression_ratio
    return KVPressScorer(press=press, compression_ratio=ratio)
