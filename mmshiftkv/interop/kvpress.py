"""Use mmshiftkv presses where kvpress expects a press (its wrappers, its pipeline).

kvpress's wrappers (``AdaKVPress``, ``ComposedPress``, ``ChunkPress``, ``DecodingPress``, ...)
accept ``ScorerPress`` instances and call their ``score()`` from their own hooks, then keep tokens
with kvpress's rules and plain ``DynamicLayer`` caches. :func:`to_kvpress` turns any mmshiftkv
press into such a scorer: its ``score()`` builds the :class:`~mmshiftkv.presses.base.ScoringState`
the press needs (no padding, as kvpress assumes) on the model kvpress's ``__call__`` announced
through ``post_init_from_model``, and returns a fresh tensor that kvpress's wrappers may write into.

Positions: used as the press itself (``with to_kvpress(press)(model):``) the scorer reads them off
the model's rotary embedding, like an mmshiftkv press, so M-RoPE prompts (Qwen-VL) are scored with
their own positions. Inside a kvpress wrapper it only sees the attention layer's arguments: the
layer's ``position_ids`` (else ``0..n-1``), checked against the layer's own ``position_embeddings``;
where they disagree (an image prompt of an M-RoPE model, whose layers get no 3-D positions) the
scorer refuses. kvpress's decoding presses hand ``score()`` a window of recent hidden states: their
positions are the ones before the current token's.

kvpress runs only on the transformers releases whose attention layers still receive
``cache_position`` and ``past_key_values`` (before 5.4); install it without its pin as the README's
kvpress section says.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

try:
    from kvpress.presses.scorer_press import ScorerPress
except ModuleNotFoundError as missing:  # kvpress itself, or a requirement installed --no-deps left out
    raise ImportError(
        f"mmshiftkv.interop.kvpress needs kvpress and its runtime requirements (missing: {missing.name}). "
        "Install them without moving transformers back: "
        "pip install 'mmshiftkv[kvpress]' && pip install --no-deps 'kvpress==0.5.5'"
    ) from missing

from mmshiftkv.models.adapter import ModelAdapter, get_adapter
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.state import ScoringState

#: Largest |cos| / |sin| difference between the layer's own position embeddings and the ones rebuilt
#: from the positions the scorer uses (float32 rotary tables agree to ~1e-6).
POSITION_TOLERANCE = 1e-3


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
    #: The positions the rotary embedding received in the forward in flight (direct use only).
    _rotary_positions: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.press, BudgetedPress):
            raise TypeError(f"press must be an mmshiftkv press, got {type(self.press).__name__}")
        super().__post_init__()

    def post_init_from_model(self, model: nn.Module) -> None:
        self._adapter = get_adapter(model)
        self.press.post_init_from_model(model)

    @contextmanager
    def __call__(self, model: nn.Module) -> Generator:
        """kvpress's ``with press(model):``, reading the positions off the model's rotary embedding."""
        rotary = get_adapter(model).rotary_emb
        handle = rotary.register_forward_pre_hook(self._record_positions, with_kwargs=True)
        try:
            with super().__call__(model):
                yield
        finally:
            handle.remove()
            self._rotary_positions = None

    def _record_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.press._state is None:  # not a rotary call made by the press while it scores
            self._rotary_positions = self._adapter.rotary_call_positions(args, kwargs)

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
                "KVPressScorer.score ran before post_init_from_model(model): use `with press(model):`. "
                "kvpress wrappers that do not pass post_init_from_model on to their press "
                "(CriticalAdaKVPress in kvpress 0.5.5) need `scorer.post_init_from_model(model)` first"
            )
        state = ScoringState(
            adapter=self._adapter,
            positions=self._positions(module, hidden_states, kwargs),
            # kvpress's hooks see embeddings only: a text model has no media tokens, a VLM's are unknown.
            image_mask=self._adapter.media_mask(None, *hidden_states.shape[:2]),
        )
        with self.press.scoring(state):
            scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs)
        # kvpress's AdaKV, CriticalAdaKV and LU-KV write into the scores in place: never hand them a
        # broadcast view (StreamingLLM's scores are one row expanded over the heads).
        return scores.contiguous()

    def _positions(self, module: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Positions of ``hidden_states``' tokens, ``(batch, n)`` or ``(3, batch, n)``."""
        batch, n_queries, _ = hidden_states.shape
        positions = self._rotary_positions
        if positions is None:
            given = kwargs.get("position_ids")
            if not isinstance(given, torch.Tensor):
                given = torch.arange(n_queries, device=hidden_states.device)[None]
            positions = self._verified_positions(module, hidden_states, given, kwargs)
        current = positions.shape[-1]
        if current < n_queries:
            # A decoding press's window: the current token(s) after earlier generated tokens, whose
            # positions follow one another (on every M-RoPE axis alike).
            earlier = positions[..., :1] - torch.arange(n_queries - current, 0, -1, device=positions.device)
            positions = torch.cat([earlier, positions], dim=-1)
        return positions[..., -n_queries:]

    def _verified_positions(
        self, module: nn.Module, hidden_states: torch.Tensor, given: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """``given`` (or, for M-RoPE, ``given`` on every axis, as text tokens have) where it reproduces
        the attention layer's own position embeddings; refuse where neither does."""
        adapter, batch = self._adapter, hidden_states.shape[0]
        candidates = [adapter.normalize_positions(given, batch)]
        if given.dim() == 2:
            candidates.append(candidates[0][None].expand(3, -1, -1))
        embeddings = kwargs.get("position_embeddings")
        if not isinstance(embeddings, tuple | list) or len(embeddings) != 2:
            return candidates[0]
        own_cos, own_sin = adapter.merge_rotary_axes(*embeddings)
        current = own_cos.shape[-2]
        for positions in candidates:
            if positions.shape[-1] < current:
                continue
            try:
                cos, sin = adapter.rotary_cos_sin(hidden_states, positions[..., -current:], module)
            except (IndexError, RuntimeError):  # 2-D positions given to an M-RoPE rotary embedding
                continue
            if (
                cos.shape == own_cos.shape
                and max(float((cos - own_cos).abs().max()), float((sin - own_sin).abs().max()))
                <= POSITION_TOLERANCE
            ):
                return positions
        given_text = "none" if kwargs.get("position_ids") is None else "given"
        raise ValueError(
            f"to_kvpress({type(self.press).__name__}) on {adapter.family}: "
            f"the attention layer's position_ids ({given_text}) do not reproduce its own position embeddings "
            "(M-RoPE models pass no 3-D positions to their attention layers), "
            "so the press would score with wrong positions. "
            "Use the scorer as the press itself "
            "(`with to_kvpress(press)(model):` reads the positions off the rotary embedding), "
            "or the mmshiftkv press with an allocator (AdaAllocator for kvpress's AdaKVPress)"
        )


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
