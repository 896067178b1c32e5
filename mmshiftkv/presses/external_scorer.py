"""Run any kvpress-style scorer under mmshiftkv budgets, allocators and caches."""

from __future__ import annotations

import warnings
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmshiftkv.models.adapter import ModelAdapter
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.session import PressSession

#: kvpress scorers whose ``score()`` reads their own ``compression_ratio``: StreamingLLM zeroes the
#: ``n_pruned`` tokens after its sinks, CriticalKV sizes its first stage with it, Compactor blends its
#: two scores with it unless ``blending=`` is set.
RATIO_READING_SCORERS = frozenset({"StreamingLLMPress", "CriticalKVPress", "CompactorPress"})


@dataclass(kw_only=True)
class ExternalScorerPress(BudgetedPress):
    """Score with another press (a kvpress ``ScorerPress`` or any scorer), keep by our rules.

    ``ExternalScorerPress(press=KnormPress(), budget=64)`` keeps 64 tokens per KV head ranked by Knorm's
    scores, the last prompt token included, in mmshiftkv's variable-length cache; an allocator can
    be added as for any press. It runs on every transformers release mmshiftkv supports: the scorer
    sees what kvpress's own ``with press(model):`` would hand it (the attention module, its input,
    the cached keys and values, the attention weights under eager attention, the attention keyword
    arguments), and for the duration of the press

    - every attention module has the ``rotary_emb`` that kvpress's ``__call__`` attaches (the
      decoder's rotary embedding; ExpectedAttention, ExpectedAttentionStats and CAP call it with
      future positions). It is a stand-in that calls the model's rotary embedding without firing
      the press's position hook, gives 1-D positions the same value on every M-RoPE axis (how
      M-RoPE models place generated text), and merges Qwen2-VL's per-axis cos/sin; it is removed
      on exit, a refusal included, and a layer's own ``rotary_emb`` is left alone;
    - the scorer's ``compression_ratio`` is the ratio kvpress would need to keep what this press
      keeps: ``compression_ratio`` itself, or for ``budget=B`` of a ``T``-token prompt
      ``1 - (B + 1/2) / T`` (kvpress keeps ``int(T * (1 - ratio)) = B``); it is restored after
      each call. This is what StreamingLLM, CriticalKV and Compactor (without ``blending=``) read
      inside ``score()``; under an allocator, where heads keep different counts, these three are
      refused.

    kvpress presses that select tokens themselves (``AdaKVPress``, ``FinchPress``, ``DecodingPress``,
    ... : they override ``compress``) are refused; mmshiftkv's allocators give the head-wise and
    layer-wise budgets. Inherited from kvpress, not fixed here: its scorers are not padding-aware
    (with a left-padded batch their statistics include padding positions; padding itself is never
    kept); ObservedAttention needs ``attn_implementation="eager"``; PyramidKV scores as SnapKV (use
    :class:`~mmshiftkv.allocators.PyramidAllocator` for its layer budgets); ExpectedAttention and CAP
    start their future positions at ``seq_len`` (not Qwen-VL's next M-RoPE position) and assume a
    full-width ``rotate_half`` rotation; kvpress applies q/k-norm only for Qwen3 and Gemma 3 classes.

    Parameters
    ----------
    press : object
        The scorer whose ``score(module, hidden_states, keys, values, attentions, kwargs)`` decides
        which tokens to keep.
    """

    chunked_prefill_refusal: ClassVar[str | None] = (
        "a wrapped scorer reads the forward's keyword arguments and attention weights, "
        "which under chunks describe only the last chunk's queries"
    )

    press: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self.press).__name__
        mro = {cls.__name__ for cls in type(self.press).__mro__}
        if callable(getattr(self.press, "compress", None)) and "ScorerPress" not in mro:
            raise TypeError(
                f"{name} is a kvpress press that selects tokens itself (it overrides compress), "
                "not a ScorerPress whose score() ExternalScorerPress can rank by. "
                "Run it with kvpress's own `with press(model):` "
                "on the transformers releases kvpress supports, "
                "or use mmshiftkv's allocators (AdaAllocator, PyramidAllocator, ...) "
                "for head-wise or layer-wise budgets"
            )
        if not callable(getattr(self.press, "score", None)):
            raise TypeError(
                "press must be a scorer "
                "with a score(module, hidden_states, keys, values, attentions, kwargs) method "
                f"(e.g. a kvpress ScorerPress), got {name}"
            )
        if self.allocator is not None and reads_compression_ratio(self.press):
            raise ValueError(
                f"{name} reads its compression_ratio inside score(), "
                f"and under {type(self.allocator).__name__} each KV head keeps its own count, "
                "so no single ratio describes the budget. "
                "Use it with a uniform budget (no allocator)"
                + (", or set blending= explicitly" if "CompactorPress" in mro else "")
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
        with self._scorer_ratio(keys.shape[2]):
            return self.press.score(module, hidden_states, keys, values, attentions, kwargs)

    def equivalent_ratio(self, seq_len: int) -> float:
        """The kvpress ``compression_ratio`` that keeps what this press keeps of a ``seq_len``-token prompt.

        kvpress keeps ``int(seq_len * (1 - ratio))`` tokens; for ``budget=B`` this is the midpoint
        ``1 - (B + 1/2) / seq_len`` of the ratios that keep ``B``, safe from float rounding.
        """
        if self.budget is None:
            return self.compression_ratio
        return max(0.0, 1.0 - (self.budget + 0.5) / seq_len)

    @contextmanager
    def _scorer_ratio(self, seq_len: int) -> Generator[None, None, None]:
        if not hasattr(self.press, "compression_ratio"):
            yield
            return
        previous = self.press.compression_ratio
        self.press.compression_ratio = self.equivalent_ratio(seq_len)
        try:
            yield
        finally:
            self.press.compression_ratio = previous

    @contextmanager
    def __call__(self, model: nn.Module) -> Generator:
        # BudgetedPress.__call__ plus the attributes kvpress's scorers read, attached once the session
        # holds the model (a refused session attaches nothing) and removed before it lets go.
        session = PressSession(self, model)
        with session.applied(), self._kvpress_attributes():
            yield
        session.warn_if_nothing_compressed()

    @contextmanager
    def _kvpress_attributes(self) -> Generator[None, None, None]:
        """``rotary_emb`` on every KV attention module, as kvpress's ``__call__`` sets it; removed on exit."""
        adapter = self._session.adapter
        attached = []
        try:
            for attention in adapter.attention_modules:
                own = getattr(attention, "rotary_emb", None)
                # kvpress's own __call__ leaves the decoder's rotary embedding behind on every layer;
                # shadowed while the press runs, visible again after. A layer's own rotary is left alone.
                if own is not None and own is not adapter.rotary_emb:
                    continue
                vars(attention)["rotary_emb"] = _ScorerRotary(self, adapter, attention)
                attached.append(attention)
            yield
        finally:
            for attention in attached:
                vars(attention).pop("rotary_emb", None)


def reads_compression_ratio(press: Any) -> bool:
    """Whether ``press`` is a kvpress scorer known to read its ``compression_ratio`` inside ``score()``."""
    mro = {cls.__name__ for cls in type(press).__mro__}
    if "CompactorPress" in mro and getattr(press, "blending", None) is not None:
        return False
    return bool(mro & RATIO_READING_SCORERS)


class _ScorerRotary:
    """``attention.rotary_emb`` while an :class:`ExternalScorerPress` runs: the decoder's rotary embedding.

    Called through ``forward`` so that the press's hook, which reads the prompt positions off the
    rotary embedding's input, does not see a scorer's future positions; attributes (``inv_freq``,
    ...) are the real module's.
    """

    def __init__(self, press: BudgetedPress, adapter: ModelAdapter, attention: nn.Module) -> None:
        self._press = press
        self._adapter = adapter
        self._attention = attention

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._adapter.rotary_emb, name)

    def __call__(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self._press._state.positions if self._press._state is not None else None
        if prompt is not None and prompt.dim() == 3 and position_ids.dim() == 2:
            # M-RoPE: generated text tokens have the same position on every axis.
            position_ids = position_ids[None].expand(3, -1, -1)
        return self._adapter.rotary_cos_sin(like, position_ids, self._attention)


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
