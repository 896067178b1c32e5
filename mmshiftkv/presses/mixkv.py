"""MixKV: an importance press's score mixed with key diversity, per KV head by its redundancy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from mmshiftkv.models.adapter import get_adapter
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.full_kv import FullKVPress
from mmshiftkv.presses.keydiff import mean_direction
from mmshiftkv.presses.redundancy import (
    RedundancySource,
    check_redundancy_shape,
    load_redundancy_scores,
    mean_pairwise_cosine,
    redundancy_table,
)
from mmshiftkv.presses.snapkv import SnapKVPress
from mmshiftkv.validation import check_int, check_real

#: Added to the min-max range and to the mean of a term before rescaling (the released code's 1e-8).
EPSILON = 1e-8


@dataclass(kw_only=True)
class MixKVPress(BudgetedPress):
    """MixKV (Liu et al., ICLR 2026, arXiv 2510.20707): importance mixed with diversity per KV head.

    Wraps an importance press (``base``, SnapKV by default, as in the paper; ShiftKV, LastAttn, a
    kvpress scorer through :class:`ExternalScorerPress`, ... too). The last ``window_size`` prompt
    tokens are kept outright (most recent first when the budget is smaller); over the other real
    tokens (the prefix), per (sample, KV head):

    * importance ``A``: the base press's score (SnapKV: window attention averaged over the window
      queries and the query heads of the KV head, average-pooled), shifted to a minimum of 0 where
      the base scores negative values (KeyDiff's ``-cos``, a ``-norm`` scorer);
    * intrinsic importance ``I`` (``intrinsic``): the values' L2 norm (VNorm, the paper's default) or
      the keys' negated L2 norm (KNorm), min-max normalised over the prefix and rescaled to the mean
      of ``A``: ``I = n * mean(A) / (mean(n) + eps)``;
    * diversity ``S``: ``-cos(k_i, mu)`` with ``mu`` the mean of the normalised keys of all real
      tokens (window included), normalised and rescaled the same way;
    * score ``r * S + (1 - r) * (A + I)`` with ``r`` the head's key redundancy (the mean pairwise
      cosine similarity of its keys): from an offline file per (layer, KV head) (``mixing="headwise"``,
      the paper's method), from the prompt itself (``"online"``), or a uniform mix (``"uniform"``:
      ``w * (S + A + I)`` with ``w = uniform_weight``; 0.5 is ``r = 0.5``).

    Tokens the base press forces (``+inf``, e.g. ExpectedAttention's sinks) stay forced, and are
    left out of the statistics. The budget counts the window and the last prompt token, as for
    :class:`SnapKVPress` (the paper's "budget 64" = 32 selected + the 32-token window).

    Default without a redundancy file: the uniform mix. It is what the released code offers without
    its per-model file (``SELECT_METHOD=mixkv``, ranking-equal), and it needs nothing the user may not
    have; the per-prompt redundancy (``"online"``) is the code's own formula, which its authors
    computed and then left unused for the offline file, so it is an option here, not the default.

    Allocators: the press never changes budgets. Under an allocator that reads scores (AdaKV), the
    allocator sees the base press's scores (``allocation="base"``), as in the released code, where
    AdaKV splits the budget by the pooled window attention and the mix only picks the tokens: an
    allocation by attention concentration, which the diversity term (rescaled to each head's mean
    attention) does not carry. ``allocation="mixed"`` hands the allocator the mixed score instead.

    The default and :meth:`reference` (the released code, xuyang-liu16/MixKV@850ec26,
    ``mixkv/mixkv_utils.py`` ``SnapKVCluster.update_kv``) share the formulas above, which the paper
    states too: the window kept whole and left out of the mixing, the min-max normalisations with
    the rescaling to the mean attention, VNorm added to the attention (the code adds it for every
    method: its ``if method == 'vnorm' or 'headwisemixkv'`` is always true), the offline
    redundancy indexed by layer and KV head, AdaKV allocating from the attention only. They differ
    in the uniform mix's weight: 0.5 here (``r = 0.5``, a convex mix), 0.33 in the code's ``mixkv``
    method (the same ranking, scores scaled by 0.66). The code's AdaKV runs
    ``AdaAllocator(alpha=0.2, window=32, normalize=True)``.

    Differences from the released code in both presets:

    * batch size > 1 with left padding (every statistic over each sample's real tokens); prompts
      not longer than the window keep their most recent tokens; budgets up to the window are
      allowed (the code asserts ``budget > window``); any base press, not only attention;
    * the value-norm min-max gets the same ``eps`` as the diversity's (the code has none: a head
      whose value norms are all equal scores NaN there), and ``intrinsic="key_norm"`` works (the
      code's KNorm branch is unreachable: ``SELECT_METHOD=knorm`` crashes);
    * the redundancy table must match the model's shape (the code reads one Qwen-7B file from its
      working directory, zero where a key is missing; its ``SnapKVCluster`` is built without
      ``layer_idx`` for ``METHOD=snapkv`` and its SparseMM + MixKV path unpacks the one table into
      two, both crash); ``mixing="online"`` uses the per-prompt value the code computes and drops;
    * PyramidKV budgets come from each prompt (the code freezes the first prompt's schedule);
    * kept tokens are stored in temporal order (the code: prefix by score, then the window);
      attention does not depend on the order of cached keys.

    Parameters
    ----------
    base : BudgetedPress, optional
        The importance press. Default: ``SnapKVPress(window_size=window_size)`` (kernel 5, average
        pooling). Only its ``score`` is used (its budget is ignored; it may not have an allocator).
        A base with a ``window_size`` must have this press's window.
    window_size : int, default=32
        Recent prompt tokens always kept and left out of the mixing.
    redundancy : str, os.PathLike or Mapping, optional
        Offline redundancy scores, a MixKV JSON file (``"layer-head-key": [floats]``, see
        :mod:`mmshiftkv.presses.redundancy`) or the loaded mapping; its key entries must cover
        the model's KV layers x KV heads (checked when the press is applied).
    mixing : {"headwise", "online", "uniform"}, optional
        Where ``r`` comes from. Default: ``"headwise"`` when ``redundancy`` is given, else ``"uniform"``.
    uniform_weight : float, default=0.5
        ``w`` of the uniform mix (the released code's ``mixkv`` method uses 0.33), ``> 0``.
    intrinsic : {"value_norm", "key_norm"} or None, default="value_norm"
        The intrinsic importance term ``I``; None leaves it out.
    allocation : {"base", "mixed"}, default="base"
        The scores an allocator that needs scores (AdaKV) receives.
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    base: BudgetedPress | None = None
    window_size: int = 32
    redundancy: RedundancySource | None = None
    mixing: Literal["headwise", "online", "uniform"] | None = None
    uniform_weight: float = 0.5
    intrinsic: Literal["value_norm", "key_norm"] | None = "value_norm"
    allocation: Literal["base", "mixed"] = "base"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.window_size, "window_size", minimum=0)
        check_real(self.uniform_weight, "uniform_weight")
        if not self.uniform_weight > 0:
            raise ValueError(f"uniform_weight must be > 0, got {self.uniform_weight}")
        if self.intrinsic not in ("value_norm", "key_norm", None):
            raise ValueError(f"intrinsic must be 'value_norm', 'key_norm' or None, got {self.intrinsic!r}")
        if self.allocation not in ("base", "mixed"):
            raise ValueError(f"allocation must be 'base' or 'mixed', got {self.allocation!r}")
        self._check_base()
        self._resolve_mixing()
        #: The base press's masked scores of the layer being compressed, for its allocator.
        self._allocation_scores: torch.Tensor | None = None

    def _check_base(self) -> None:
        if self.base is None:
            self.base = SnapKVPress(window_size=self.window_size)
        if not isinstance(self.base, BudgetedPress) or isinstance(self.base, MixKVPress | FullKVPress):
            raise TypeError(
                "base must be an mmshiftkv importance press (SnapKVPress, ShiftKVPress, ... or an "
                f"ExternalScorerPress around a kvpress scorer), got {type(self.base).__name__}"
            )
        if self.base.allocator is not None:
            raise ValueError(
                f"the base {type(self.base).__name__} only scores tokens: give the allocator to MixKVPress"
            )
        base_window = getattr(self.base, "window_size", None)
        if base_window is not None and base_window != self.window_size:
            raise ValueError(
                f"MixKVPress has window_size={self.window_size} but its base {type(self.base).__name__} has "
                f"window_size={base_window}: the base's window must be the one MixKV keeps"
            )

    def _resolve_mixing(self) -> None:
        if self.mixing is None:
            self.mixing = "headwise" if self.redundancy is not None else "uniform"
        if self.mixing not in ("headwise", "online", "uniform"):
            raise ValueError(f"mixing must be 'headwise', 'online' or 'uniform', got {self.mixing!r}")
        if self.mixing == "headwise" and self.redundancy is None:
            raise ValueError("mixing='headwise' needs redundancy=... (a MixKV redundancy file or mapping)")
        if self.mixing != "headwise" and self.redundancy is not None:
            raise ValueError(f"redundancy=... is read by mixing='headwise' only, not mixing={self.mixing!r}")
        self._table: torch.Tensor | None = None
        if self.redundancy is not None:
            self._table = redundancy_table(load_redundancy_scores(self.redundancy))
            self._where = "redundancy scores"
            if not isinstance(self.redundancy, Mapping):
                self._where = f"redundancy file {os.fspath(self.redundancy)!r}"

    @classmethod
    def reference(cls, **overrides) -> MixKVPress:
        """The released code (``SnapKVCluster.update_kv``, xuyang-liu16/MixKV@850ec26) as a preset.

        SnapKV over a 32-token window (kernel 5, average pooling, mean over the query heads of a
        KV head) with the window always kept; VNorm always added; with ``redundancy=`` its
        ``headwisemixkv`` method, without it its ``mixkv`` method (``0.33 * (S + A + Vn)``);
        allocators that need scores (AdaKV) see the pooled attention. Any field can be overridden,
        e.g. ``MixKVPress.reference(budget=64, redundancy="qwen_kv_similarity.json")``.
        """
        preset = dict(window_size=32, uniform_weight=0.33, intrinsic="value_norm", allocation="base")
        return cls(**{**preset, **overrides})

    def post_init_from_model(self, model: nn.Module) -> None:
        self.base.post_init_from_model(model)
        if self._table is not None:
            adapter = get_adapter(model)
            check_redundancy_shape(self._table, adapter.n_layers, adapter.n_kv_heads, self._where)

    # ------------------------------------------------------ chunked prefill
    def chunked_prefill_reason(self) -> str | None:
        """The base press's reason (MixKV itself reads only keys and values), then the allocator's."""
        reason = self.base.chunked_prefill_reason()
        if reason is not None:
            return f"its base press {type(self.base).__name__} cannot: {reason}"
        return super().chunked_prefill_reason()

    @property
    def prefill_rows(self) -> int | None:
        """The base press's rows (SnapKV's window)."""
        return self.base.prefill_rows

    def accumulate_chunk(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        real: torch.Tensor,
        keys: torch.Tensor | None,
        previous: object,
    ) -> object:
        """The base press's accumulation, which its ``score`` finds under MixKV's prompt state."""
        with self.base.scoring(self.state):
            return self.base.accumulate_chunk(module, hidden_states, real, keys, previous)

    # ---------------------------------------------------------------- scoring
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
        window = min(self.window_size, seq_len)
        prefix = seq_len - window
        with self.base.scoring(state):
            base_scores = self.base.score(module, hidden_states, keys, values, attentions, kwargs).float()
        if self.allocation == "base" and self.allocator is not None and self.allocator.needs_scores:
            masked = base_scores
            if state.key_mask is not None:
                masked = base_scores.masked_fill(~state.key_mask[:, None, :], float("-inf"))
            self._allocation_scores = masked
        real = state.real_tokens(batch, seq_len, keys.device)
        valid = real[:, None, :prefix].expand(batch, kv_heads, prefix)
        mixed = self.mix(
            base_scores[..., :prefix], keys, values, real, valid, self._redundancy(module, keys, real)
        )
        # The window outranks every prefix score, its later tokens first.
        top = torch.ones(batch, kv_heads, 1, device=keys.device)
        if prefix > 0:
            top = mixed.masked_fill(~(valid & mixed.isfinite()), 0).abs().amax(-1, keepdim=True).clamp(min=1)
        recency = 2.0 + torch.arange(window, device=keys.device, dtype=torch.float32) / max(window, 1)
        return torch.cat([mixed, top * recency], dim=-1)

    def mix(
        self,
        importance: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        real: torch.Tensor,
        valid: torch.Tensor,
        redundancy: torch.Tensor | None,
    ) -> torch.Tensor:
        """The mixed score of the prefix tokens, ``(batch, kv_heads, prefix)`` float32.

        Parameters
        ----------
        importance : torch.Tensor
            The base press's scores of the prefix, ``(batch, kv_heads, prefix)``.
        keys, values : torch.Tensor
            All prompt keys (rotated) and values, ``(batch, kv_heads, seq_len, head_dim)``.
        real : torch.Tensor
            ``(batch, seq_len)`` bool, True for real tokens.
        valid : torch.Tensor
            ``(batch, kv_heads, prefix)`` bool, the real prefix tokens.
        redundancy : torch.Tensor or None
            ``r`` broadcastable to ``(batch, kv_heads, 1)``; None for the uniform mix.
        """
        prefix = importance.shape[-1]
        if prefix == 0:
            return importance
        finite = valid & importance.isfinite()
        # Negative importance is shifted to a minimum of 0 (a head without finite scores: inf clamped to 0).
        lowest = importance.masked_fill(~finite, float("inf")).amin(-1, keepdim=True)
        importance = importance - lowest.clamp(max=0)
        target = _masked_mean(importance, finite)

        anchor = mean_direction(keys, real)
        dissimilarity = -F.cosine_similarity(keys[..., :prefix, :].float(), anchor, dim=-1)
        diversity = _rescaled(dissimilarity, valid, target)
        combined = importance
        if self.intrinsic == "value_norm":
            combined = importance + _rescaled(values[..., :prefix, :].float().norm(dim=-1), valid, target)
        elif self.intrinsic == "key_norm":
            combined = importance + _rescaled(-keys[..., :prefix, :].float().norm(dim=-1), valid, target)
        if redundancy is None:
            mixed = self.uniform_weight * (diversity + combined)
        else:
            mixed = redundancy * diversity + (1 - redundancy) * combined
        # Tokens the base forces in (+inf) or out (-inf) stay so; padding scores 0 (masked later).
        mixed = torch.where(finite, mixed, importance)
        return mixed.masked_fill(~valid, 0.0)

    def _redundancy(self, module: nn.Module, keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor | None:
        """``r`` per (sample, KV head), ``(batch or 1, kv_heads, 1)`` float32, or None (uniform mix)."""
        if self.mixing == "uniform":
            return None
        if self.mixing == "online":
            return mean_pairwise_cosine(keys, real)[..., None]
        adapter = self.state.adapter
        check_redundancy_shape(self._table, adapter.n_layers, adapter.n_kv_heads, self._where)
        return self._table[adapter.ordinal(module)].to(keys.device)[None, :, None]

    # ------------------------------------------------------------ allocation
    def kept_counts(self, layer: int, n_tokens: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """As in :class:`BudgetedPress`; with ``allocation="base"`` the allocator reads the base's scores."""
        base_scores, self._allocation_scores = self._allocation_scores, None
        if scores is not None and base_scores is not None:
            scores = base_scores
        return super().kept_counts(layer, n_tokens, scores)


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the last dimension of the ``valid`` entries, ``(..., 1)``; 0 where none is valid."""
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    return x.masked_fill(~valid, 0).sum(-1, keepdim=True) / count


def _rescaled(x: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x`` min-max normalised over the ``valid`` entries, rescaled so that its mean is ``target``.

    ``n = (x - min) / (max - min + eps)``, ``n * target / (mean(n) + eps)``: the normalisation and
    rescaling of MixKV's intrinsic and diversity terms (to the magnitude of the attention scores).
    """
    low = x.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    high = x.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    empty = ~valid.any(-1, keepdim=True)
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    normalized = (x - low) / (high - low + EPSILON)
    return normalized * (target / (_masked_mean(normalized, valid) + EPSILON))
