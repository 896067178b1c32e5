"""Layer budgets from a statistic of every layer's prompt attention (MEDA, VL-Cache).

The per-layer allocators (PyramidKV, AdaKV, SparseMM) give layer ``l`` a table that depends on
that layer alone. A :class:`LayerBudgetAllocator` splits the whole model's budget between the layers
by a weight each layer's prompt attention yields (MEDA: attention entropy, VL-Cache: attention
density), so no layer's budget is known before every layer has been seen. A press under such an
allocator scores every layer at its attention as usual, keeps the scores and the layer's
statistic (:meth:`LayerBudgetAllocator.layer_statistic`), and selects and compresses all layers
once the prefill forward is done (:mod:`mmshiftkv.presses.deferred`).

The statistic is read from :class:`QueryBlock` s: the attention logits of a block of the prompt
queries the allocator asks for (:meth:`~LayerBudgetAllocator.statistic_queries`) over every
prompt key, with the model's own visibility (causal, or its 4-D mask, padding excluded). The
press side computes them block by block, so memory stays bounded whatever the prompt's length.

Budgets (per sample; the shared rules of :mod:`mmshiftkv.allocators.base` hold):

* ``n <= B``: every layer keeps ``n`` (uncompressed).
* Otherwise the ``L`` layers share ``T = L * B`` tokens per KV head. Layer ``l`` gets
  ``x_l = clip(lam * w_l, low, n)`` with ``lam`` chosen so that ``sum x_l = T``: in proportion to
  its weight ``w_l``, with what the bounds cut off redistributed to the other layers in proportion to
  theirs (:func:`apportion`). ``low`` is one token (the last prompt token) unless the allocator
  asks for more (:meth:`~LayerBudgetAllocator.lowest_budget`).
* Integers by the largest remainder: ``floor(x_l)``, then one more token to each of the
  ``T - sum floor(x_l)`` layers with the largest fractional parts (ties to the lower layer).
  Hence ``sum_l B_l = L * B`` exactly, and, the heads of a layer keeping the same count, the total
  over layers and heads is ``L * H_kv * B``: Uniform's total, moved between layers.

Layers that cannot be compressed (sliding-window layers) keep their window and take no part: ``L``
counts the layers the allocator shares the budget between.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmshiftkv.allocators.base import Allocator
from mmshiftkv.validation import check_real


@dataclass(frozen=True)
class QueryBlock:
    """Attention logits of a block of prompt queries over every prompt key, in one layer.

    Attributes
    ----------
    logits : torch.Tensor
        ``(batch, q_heads, rows, seq_len)`` float32: ``q . k`` times the layer's scaling, the
        queries and keys rotated as the model rotates them; nothing masked.
    query_index : torch.Tensor
        ``(rows,)`` int64, the prompt positions of the rows.
    queries : torch.Tensor
        ``(batch, rows)`` bool: the rows the allocator asked for, real tokens only.
    visible : torch.Tensor
        ``(batch, rows, seq_len)`` bool: the keys each row's query sees in the model (causal, or the
        model's own mask such as Gemma 3's bidirectional image blocks), padding excluded.
    """

    logits: torch.Tensor
    query_index: torch.Tensor
    queries: torch.Tensor
    visible: torch.Tensor


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``allowed`` keys; rows without any are all zero.

    ``logits`` ``(batch, heads, rows, keys)``, ``allowed`` broadcastable to it (e.g. ``(batch, 1,
    rows, keys)``). Float32 whatever the input.
    """
    return torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``-sum_j p_j log p_j`` over the last dim, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def post_vision_queries(
    key_mask: torch.Tensor, image_mask: torch.Tensor, fallback_window: int
) -> torch.Tensor:
    """VL-Cache's post-vision tokens: the real tokens after each sample's last image/video token.

    A sample without an image token, or whose prompt ends with one, has none; its last
    ``fallback_window`` real tokens stand in (a SnapKV-like observation window; our decision, the
    paper has only image prompts).

    Parameters
    ----------
    key_mask : torch.Tensor
        ``(batch, seq_len)`` bool, True for real tokens.
    image_mask : torch.Tensor
        ``(batch, seq_len)`` bool, True for image and video tokens.
    fallback_window : int
        Tokens standing in for the post-vision span where there is none.

    Returns
    -------
    torch.Tensor
        ``(batch, seq_len)`` bool.
    """
    positions = torch.arange(key_mask.shape[1], device=key_mask.device)
    images = image_mask & key_mask
    last_image = torch.where(images, positions, -1).amax(-1)
    after = key_mask & (positions[None, :] > last_image[:, None])
    real_from_end = key_mask.flip(-1).long().cumsum(-1).flip(-1)
    fallback = key_mask & (real_from_end <= fallback_window)
    has_post_vision = images.any(-1, keepdim=True) & after.any(-1, keepdim=True)
    return torch.where(has_post_vision, after, fallback)


def apportion(weights: torch.Tensor, total: int, low: int, high: int) -> torch.Tensor:
    """Integers in ``[low, high]`` summing to ``total``, in proportion to ``weights`` as the bounds allow.

    ``x_l = clip(lam * w_l, low, high)`` with the level ``lam`` that makes them sum to ``total``,
    then the largest-remainder rounding of the module docstring. Weights are clamped at 0; all-zero
    weights share evenly; zero-weight layers get ``low`` unless the others are all at ``high``.

    Parameters
    ----------
    weights : torch.Tensor
        ``(L,)`` finite, non-negative weights.
    total : int
        Tokens to share, ``L * low <= total <= L * high``.
    low, high : int
        Bounds of every share.

    Returns
    -------
    torch.Tensor
        ``(L,)`` int64 summing to ``total``.

    Raises
    ------
    ValueError
        If a weight is not finite or the total cannot be met within the bounds.
    """
    w = weights.detach().to("cpu", torch.float64).flatten()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"layer weights must be finite, got {w.tolist()}")
    n_layers = w.numel()
    if not n_layers * low <= total <= n_layers * high:
        raise ValueError(f"cannot share {total} tokens between {n_layers} layers within [{low}, {high}] each")
    w = w.clamp(min=0)
    if not bool((w > 0).any()):
        w = torch.ones_like(w)
    shares = _water_fill(w, float(total), float(low), float(high))
    positive = w > 0
    shortfall = total - float(shares.sum())
    if shortfall > 0.5 and not bool(positive.all()):
        # Every weighted layer is at ``high``: the zero-weight layers share what is left evenly.
        shares[~positive] = _water_fill(
            torch.ones(int((~positive).sum()), dtype=torch.float64),
            total - float(shares[positive].sum()),
            float(low),
            float(high),
        )
    counts = shares.floor().clamp(low, high)
    remainder = total - int(counts.sum())
    order = sorted(
        (i for i in range(n_layers) if counts[i] < high),
        key=lambda i: (-(float(shares[i]) - float(counts[i])), i),
    )
    if not 0 <= remainder <= len(order):
        raise RuntimeError(f"apportion: {remainder} tokens left for {len(order)} layers ({shares.tolist()})")
    counts[order[:remainder]] += 1
    return counts.long()


def _water_fill(w: torch.Tensor, total: float, low: float, high: float) -> torch.Tensor:
    """``clip(lam * w, low, high)`` with the ``lam`` that makes the sum ``total`` (or as near as it gets).

    The sum is piecewise linear in ``lam``, with breakpoints where a layer reaches a bound: find the
    piece that crosses ``total`` and solve it.
    """

    def shares(lam: float) -> torch.Tensor:
        return (lam * w).clamp(low, high)

    levels = [0.0, *sorted({bound / x for x in w.tolist() if x > 0 for bound in (low, high)})]
    for previous, level in zip(levels, levels[1:]):
        if float(shares(level).sum()) >= total:
            middle = (previous + level) / 2
            free = (middle * w > low) & (middle * w < high)
            fixed = float(shares(middle)[~free].sum())
            slope = float(w[free].sum())
            lam = (total - fixed) / slope if slope > 0 else level
            return shares(min(max(lam, previous), level))
    return shares(levels[-1])


@dataclass
class LayerBudgetAllocator(Allocator):
    """Base of the allocators whose layer budgets come from every layer's prompt attention.

    Subclasses say which queries they read (:meth:`statistic_queries`), reduce one layer's
    :class:`QueryBlock` s to one number per sample (:meth:`layer_statistic`) and turn the layers'
    numbers into weights (:meth:`layer_weights`); :meth:`allocate_layers` applies the rules of the
    module docstring. Layer budgets are uniform over the KV heads of a layer.
    """

    needs_all_layers: ClassVar[bool] = True

    def statistic_queries(self, key_mask: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """``(batch, seq_len)`` bool: the queries :meth:`layer_statistic` reads (default: every real one)."""
        return key_mask

    # ------------------------------------------------------ chunked prefill
    @property
    def prefill_rows(self) -> int:
        """Trailing attention-input rows kept across the chunks of a chunked prefill (default 0), for
        queries that only the complete prompt designates (VL-Cache's fallback window)."""
        return 0

    def chunked_prefill_refusal(self) -> str | None:
        """Why this allocator's statistic cannot be gathered chunk by chunk, or None where it can.

        Where it can, the statistic is a ratio of sums over its queries (:meth:`layer_sums`), and each
        query's attention is complete in its chunk (it sees no later key).
        """
        return None

    def chunk_queries(
        self, real: torch.Tensor, image_mask: torch.Tensor | None, seen_image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk's share of :meth:`statistic_queries`, as far as the prompt has come.

        Parameters
        ----------
        real : torch.Tensor
            ``(batch, n_tokens)`` bool, the chunk's real tokens.
        image_mask : torch.Tensor or None
            ``(batch, n_tokens)`` bool, the chunk's image/video tokens.
        seen_image : torch.Tensor or None
            ``(batch,)`` bool, whether an earlier chunk held an image token (None: the first chunk).

        Returns
        -------
        tuple of torch.Tensor
            ``queries`` ``(batch, n_tokens)`` bool; ``restart`` ``(batch,)`` bool, True where the earlier
            chunks' sums no longer count; ``seen_image`` ``(batch,)`` bool, updated. Default: every real
            query, never a restart.
        """
        seen = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
        return real, seen.clone(), seen if seen_image is None else seen_image

    def layer_sums(
        self, blocks: Iterable[QueryBlock], key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(numerator, denominator)``, each ``(batch,)`` float64: sums over the blocks' queries whose
        ratio is :meth:`layer_statistic` (where :meth:`chunked_prefill_refusal` is None)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-query sums")

    @abstractmethod
    def layer_statistic(
        self, blocks: Iterable[QueryBlock], key_mask: torch.Tensor, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One layer's statistic per sample, ``(batch,)`` float64.

        Parameters
        ----------
        blocks : iterable of QueryBlock
            The layer's attention logits for the queries of :meth:`statistic_queries`, block by block.
        key_mask : torch.Tensor
            ``(batch, seq_len)`` bool, True for real tokens.
        image_mask : torch.Tensor or None
            ``(batch, seq_len)`` bool, True for image/video tokens; None when the prompt's token ids
            are unknown (``inputs_embeds`` only).
        """

    @abstractmethod
    def layer_weights(self, statistics: torch.Tensor) -> torch.Tensor:
        """Weights ``(L,)`` float64 of one sample's layers from their statistics ``(L,)``."""

    def lowest_budget(self, budget: int, n: int) -> int:
        """The fewest tokens a layer keeps for a sample of ``n > budget`` real tokens (default 1)."""
        return 1

    def allocate_layers(self, budget: int, n_tokens: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        """Tokens to keep per (layer, sample, KV head) from every layer's statistic.

        Parameters
        ----------
        budget : int
            Mean per-KV-head budget B (last prompt token included), >= 1.
        n_tokens : torch.Tensor
            ``(batch,)`` int64, real prompt tokens per sample.
        statistics : torch.Tensor
            ``(L, batch)``: :meth:`layer_statistic` of each layer that shares the budget.

        Returns
        -------
        torch.Tensor
            ``(L, batch, kv_heads)`` int64 on ``n_tokens``' device; per sample ``n_tokens[b]``
            everywhere if ``n_tokens[b] <= budget``, else layer budgets summing to ``L * budget``.
        """
        if self.n_layers == 0:
            raise RuntimeError(
                f"{type(self).__name__}.bind(n_layers, n_heads, n_kv_heads) must be called first"
            )
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an int >= 1 (tokens per KV head), got {budget!r}")
        lengths = torch.as_tensor(n_tokens).tolist()
        if statistics.dim() != 2 or statistics.shape[1] != len(lengths):
            raise ValueError(
                f"statistics must have shape (layers, batch={len(lengths)}), got {tuple(statistics.shape)}"
            )
        n_layers = statistics.shape[0]
        kept = torch.empty(n_layers, len(lengths), dtype=torch.long)
        for b, n in enumerate(lengths):
            if n <= budget:
                kept[:, b] = n
                continue
            low = min(budget, max(1, self.lowest_budget(budget, n)))
            weights = self.layer_weights(statistics[:, b].double().cpu())
            kept[:, b] = apportion(weights, n_layers * budget, low, n)
        counts = kept[:, :, None].expand(-1, -1, self.n_kv_heads)
        return counts.to(torch.as_tensor(n_tokens).device)

    def allocate(
        self, budget: int, layer_idx: int, n_tokens: torch.Tensor, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Not available: one layer's budget depends on every layer. Use :meth:`allocate_layers`."""
        raise TypeError(
            f"{type(self).__name__} shares the budget between layers by every layer's attention: "
            "use it as a press's allocator (the press compresses all layers at the end of the prefill), "
            "or call allocate_layers(budget, n_tokens, statistics)"
        )

    def _allocate_sample(
        self, budget: int, layer_idx: int, n: int, scores: torch.Tensor | None
    ) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} allocates every layer at once (allocate_layers)")


def post_vision_so_far(
    real: torch.Tensor, image_mask: torch.Tensor, seen_image: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's :func:`post_vision_queries` as far as the prompt has come: its real tokens after the
    last image token so far.

    ``real`` and ``image_mask``: ``(batch, n_tokens)`` bool of the chunk; ``seen_image``: ``(batch,)``
    bool, an image token in an earlier chunk (None: the first chunk). Returns ``queries`` ``(batch,
    n_tokens)``, ``restart`` ``(batch,)`` (an image token in this chunk: the earlier chunks' post-vision
    queries were not post-vision after all) and the updated ``seen_image``. Where the complete prompt
    ends up without post-vision tokens, the fallback window replaces whatever was gathered.
    """
    image = image_mask.to(real.device, torch.bool) & real
    index = torch.arange(real.shape[1], device=real.device)
    last_image = torch.where(image, index, -1).amax(-1)
    restart = image.any(-1)
    seen = restart if seen_image is None else seen_image.to(real.device) | restart
    return real & (index[None, :] > last_image[:, None]) & seen[:, None], restart, seen


def require_image_mask(image_mask: torch.Tensor | None, key_mask: torch.Tensor, who: str) -> torch.Tensor:
    """``image_mask`` checked against ``key_mask``'s shape; a clear error when it is unknown."""
    if image_mask is None:
        raise ValueError(
            f"{who} needs the positions of the image tokens: run the model on input_ids "
            "(not inputs_embeds alone), or bind a ScoringState with image_mask=(batch, seq_len)"
        )
    if image_mask.shape != key_mask.shape:
        raise ValueError(
            f"{who}: image_mask has shape {tuple(image_mask.shape)}, "
            f"the prompt is (batch, seq_len) = {tuple(key_mask.shape)}"
        )
    return image_mask.to(key_mask.device, torch.bool)


def check_fraction(value: object, name: str, *, low_open: bool = False) -> float:
    """A finite number in ``[0, 1]`` (``(0, 1]`` with ``low_open``); errors name the field ``name``."""
    check_real(value, name)
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return float(value)
