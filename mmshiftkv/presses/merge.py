"""Merging evicted KV into the kept entries: the step between a press's selection and the stored layer.

A press that merges (:meth:`BudgetedPress.merge <mmshiftkv.presses.base.BudgetedPress.merge>`) hands
the layer its kept keys and values after folding the evicted ones in; storage
(:class:`~mmshiftkv.cache.CompressedLayer`) and its byte count stay those of the kept tokens.

:func:`merge_evicted` is LOOK-M's merge (Wan et al., EMNLP 2024 Findings, Sec. 3.3 / Fig. 4; MEDA,
NAACL 2025, reuses its average merge), per (sample, KV head), on uniform and head-wise selections alike:
each evicted token ``i`` goes to the kept token ``t(i)`` whose key is most cosine-similar to its key
(the first on ties), with similarity ``w_i``; a kept token ``j`` that receives the tokens ``S_j``
(``n_j = |S_j|``) becomes, for its key and its value alike,

* ``"pivot"``: ``(x_j + sum_{i in S_j} (x_i + x_j) / 2) / (1 + n_j)`` (each evicted token is first
  averaged with its pivot);
* ``"average"``: ``(x_j + sum_{i in S_j} x_i) / (1 + n_j)``;
* ``"weighted"``: ``(x_j + sum_{i in S_j} w_i x_i) / (1 + n_j)``.

These are the released code's formulas (``scatter_reduce(..., "mean", include_self=True)``), computed
in float32. ``as_released=True`` adds that code's two further details: the average and weighted merges
keep only the evicted ranks ``r`` (the r-th evicted token of every head, in temporal order) whose mean
best similarity over the heads is at least the mean over all heads and ranks, and the average merge adds
the *first* ``n_f`` evicted tokens into the targets of the ``n_f`` kept ranks (its source/target
misalignment). Keys and values of a kept token stay aligned (LOOK-M's code; MixKV's copy of the merge
orders them differently).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

MergeRule = Literal["pivot", "average", "weighted"]
MERGE_RULES: tuple[str, ...] = ("pivot", "average", "weighted")

#: Similarities of one block of evicted tokens: 64 MB of float32 temporaries.
SIMILARITY_BLOCK_ELEMENTS = 1 << 24
#: Keeps the cosine of an all-zero key finite (it is then 0 against every kept key).
NORM_EPS = 1e-12


def evicted_indices(
    indices: torch.Tensor, lengths: torch.Tensor, seq_len: int, key_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real prompt tokens each (sample, KV head) does not keep, in temporal order.

    Parameters
    ----------
    indices, lengths : torch.Tensor
        A selection as :func:`~mmshiftkv.presses.selection.select_kept_indices` returns it:
        ``(batch, kv_heads, max_kept)`` with row ``(b, h)`` valid up to ``lengths[b, h]``.
    seq_len : int
        Prompt length (padding included).
    key_mask : torch.Tensor, optional
        ``(batch, seq_len)`` bool, True for real tokens; padding is never evicted (nor kept).

    Returns
    -------
    evicted : torch.Tensor
        ``(batch, kv_heads, max_evicted)`` int64, row ``(b, h)`` valid up to ``counts[b, h]`` (then 0).
    counts : torch.Tensor
        ``(batch, kv_heads)`` int64.
    """
    batch, kv_heads, max_kept = indices.shape
    valid = torch.arange(max_kept, device=indices.device) < lengths[..., None]
    # Unused slots point at a spare column, so they cannot unmark a kept token.
    slots = indices.masked_fill(~valid, seq_len)
    kept = torch.zeros(batch, kv_heads, seq_len + 1, dtype=torch.bool, device=indices.device)
    kept.scatter_(2, slots, True)
    evicted = ~kept[..., :seq_len]
    if key_mask is not None:
        evicted &= key_mask[:, None, :].to(evicted.device)
    counts = evicted.sum(-1)
    position = torch.arange(seq_len, device=indices.device).expand(batch, kv_heads, -1)
    ordered = position.masked_fill(~evicted, seq_len).sort(dim=-1).values[..., : int(counts.max())]
    return ordered.masked_fill(ordered == seq_len, 0), counts


def _gather(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states[b, h, index[b, h, k]]``: ``(batch, kv_heads, n, head_dim)``."""
    return states.gather(2, index[..., None].expand(-1, -1, -1, states.shape[-1]))


def _released_filter(similarity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The released code's rank filter: rank ``r`` merges where its head-mean similarity >= the mean.

    ``similarity``, ``valid``: ``(batch, kv_heads, max_evicted)``. With head-wise selections a rank
    averages over the heads that evict that many tokens (the released code only has uniform ones).
    """
    weights = similarity.masked_fill(~valid, 0.0)
    per_rank = weights.sum(1) / valid.sum(1).clamp(min=1)
    overall = weights.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
    return valid & (per_rank >= overall[:, None])[:, None, :]


def merge_evicted(
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    lengths: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    rule: MergeRule,
    as_released: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept keys and values with the evicted tokens merged in (see the module docstring).

    Parameters
    ----------
    keys, values : torch.Tensor
        The layer's prefill cache, ``(batch, kv_heads, seq_len, head_dim)`` (keys as cached: rotated).
    indices, lengths : torch.Tensor
        The selection, as :func:`~mmshiftkv.presses.selection.select_kept_indices` returns it.
    key_mask : torch.Tensor, optional
        ``(batch, seq_len)`` bool, True for real tokens.
    rule : {"pivot", "average", "weighted"}
        How a kept token absorbs the tokens merged into it.
    as_released : bool, default=False
        Apply the released code's rank filter (average, weighted) and source misalignment (average).

    Returns
    -------
    kept_keys, kept_values : torch.Tensor
        ``(batch, kv_heads, max_kept, head_dim)`` in the input dtype, slot ``k`` of row ``(b, h)``
        holding (the merge into) token ``indices[b, h, k]`` for ``k < lengths[b, h]``.
    """
    if rule not in MERGE_RULES:
        raise ValueError(f"rule must be one of {', '.join(MERGE_RULES)}, got {rule!r}")
    kept_keys, kept_values = _gather(keys, indices), _gather(values, indices)
    evicted, n_evicted = evicted_indices(indices, lengths, keys.shape[2], key_mask)
    if evicted.shape[-1] == 0:
        return kept_keys, kept_values
    targets, similarity = _best_targets(keys, kept_keys, evicted, lengths)
    merging = torch.arange(evicted.shape[-1], device=keys.device) < n_evicted[..., None]
    sources = evicted
    if as_released and rule != "pivot":
        merging = _released_filter(similarity, merging)
        if rule == "average":
            # Column c of the released scatter pairs the c-th kept rank's target with evicted token c.
            column = (merging.long().cumsum(-1) - 1).clamp(min=0)
            sources = evicted.gather(-1, column)
    weight = {"pivot": 0.5, "average": 1.0}.get(rule)
    coefficient = merging.float() * (similarity if weight is None else weight)
    received = torch.zeros(kept_keys.shape[:3], dtype=torch.float32, device=keys.device)
    received.scatter_add_(2, targets, merging.float())
    # Pivot: each evicted token brings half of its target along, so the target weighs 1 + n_j / 2.
    own = 1.0 + received / 2 if rule == "pivot" else torch.ones_like(received)
    merged = []
    for states, kept in ((keys, kept_keys), (values, kept_values)):
        total = kept.float() * own[..., None]
        total.scatter_add_(
            2,
            targets[..., None].expand(-1, -1, -1, states.shape[-1]),
            _gather(states, sources).float() * coefficient[..., None],
        )
        merged.append((total / (1.0 + received[..., None])).to(states.dtype))
    return merged[0], merged[1]


def _best_targets(
    keys: torch.Tensor, kept_keys: torch.Tensor, evicted: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per evicted token, the kept slot whose key is most cosine-similar and that similarity.

    Returns ``(batch, kv_heads, max_evicted)`` int64 slots and float32 similarities, computed in blocks
    of evicted tokens (at most :data:`SIMILARITY_BLOCK_ELEMENTS` similarities at a time).
    """
    batch, kv_heads, max_kept, _ = kept_keys.shape
    unit_kept = F.normalize(kept_keys.float(), dim=-1, eps=NORM_EPS).transpose(-1, -2)
    unused = torch.arange(max_kept, device=keys.device) >= lengths[..., None]
    block = max(1, SIMILARITY_BLOCK_ELEMENTS // (batch * kv_heads * max_kept))
    targets, similarities = [], []
    for start in range(0, evicted.shape[-1], block):
        unit = F.normalize(_gather(keys, evicted[..., start : start + block]).float(), dim=-1, eps=NORM_EPS)
        similarity = torch.matmul(unit, unit_kept).masked_fill(unused[:, :, None, :], float("-inf"))
        best, target = similarity.max(dim=-1)
        targets.append(target)
        similarities.append(best)
    return torch.cat(targets, dim=-1), torch.cat(similarities, dim=-1)
