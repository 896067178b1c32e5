"""Padding and visibility read off the attention mask a decoder receives, whatever its form.

The readers behind :class:`~mmshiftkv.presses.state.ScoringState`'s ``key_mask`` and ``visibility``;
:func:`~mmshiftkv.cache.attention.visible` turns each mask's values into booleans.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mmshiftkv.cache.attention import visible


def padding_mask(mask: object, past: int = 0) -> torch.Tensor | None:
    """``(batch, kv_len)`` bool of real keys from the mask a decoder receives, or None without padding.

    The decoder may receive a 2-D padding mask, a 4-D mask (boolean, True = visible, or additive,
    0 = visible), or a dict of those per layer type (transformers >= 5.2 pre-builds them in
    ``generate``; Gemma 3 always does). Keys the last query of the widest mask may not see are
    padding (under left padding the last token is real and sees every real key; a sliding-window
    mask, narrower, says nothing about padding). ``past``: tokens the cache held before the forward (a
    later chunk of a chunked prefill), whose keys the mask's first columns describe.
    """
    real = last_row_visibility(mask, past)
    return None if real is None or bool(real.all()) else real


def last_row_visibility(mask: object, past: int = 0) -> torch.Tensor | None:
    """``(batch, kv_len)`` bool: the keys the last query of the widest mask sees (2-D: the mask itself)."""
    if isinstance(mask, dict):
        return _widest(last_row_visibility(value, past) for value in mask.values())
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.ndim == 2:
        return mask.bool()
    if mask.ndim == 4:
        # At prefill the keys are the cached tokens and the queries; further columns are empty slots of
        # a static cache.
        return visible(mask[:, 0, -1, : past + mask.shape[2]])
    return None


def full_mask(mask: object) -> torch.Tensor | None:
    """The widest 4-D mask ``(batch or 1, 1, q_len, kv_len)`` a decoder received, or None (2-D or no mask).

    With a dict of masks per layer type (Gemma 3's sliding and full layers), the one whose last query
    sees the most keys: the full-attention layers' mask, the one of the layers a press compresses.
    """
    if isinstance(mask, dict):
        candidates = [m for m in (full_mask(value) for value in mask.values()) if m is not None]
        return max(candidates, key=lambda m: int(last_row_visibility(m).sum())) if candidates else None
    return mask if isinstance(mask, torch.Tensor) and mask.ndim == 4 else None


def _widest(found: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """Of several layer types' visibilities, the one that lets the most keys be seen."""
    candidates = [m for m in found if m is not None]
    return max(candidates, key=lambda m: int(m.sum())) if candidates else None


#: Prompt queries whose visibility rows a press may need (SnapKV's default window is 32).
VISIBILITY_ROWS = 64


def last_rows(mask: object, rows: int = VISIBILITY_ROWS, past: int = 0) -> torch.Tensor | None:
    """``(batch, rows, kv_len)`` bool visibility of the last query rows of the widest 4-D mask, or None.

    Only masks that are not plain causal matter (bidirectional image blocks); a 2-D padding mask or
    no mask means causal attention, which the presses apply themselves. ``past`` as for
    :func:`padding_mask`.
    """
    if isinstance(mask, dict):
        return _widest(last_rows(value, rows, past) for value in mask.values())
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        return None
    seen = visible(mask[:, 0, -rows:, : past + mask.shape[2]])
    q_len, kv_len = seen.shape[1], seen.shape[2]
    query_index = torch.arange(kv_len - q_len, kv_len, device=seen.device)
    beyond_causal = torch.arange(kv_len, device=seen.device)[None, :] > query_index[:, None]
    return seen if bool((seen & beyond_causal).any()) else None


def block_edges(mask: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Whether a forward's first and last query sit inside a bidirectional block of the 4-D mask(s).

    Returns ``(opens, closes)``, ``(batch,)`` bool each: ``opens`` where the first query sees the key
    after it (a block that continues past the forward's first token), ``closes`` where the query
    before the last sees the last key (a block that reaches the forward's last token); None for a
    causal or 2-D mask, or a forward of one token. A block that closes one chunk of a chunked
    prefill and opens the next was split between them.
    """
    if isinstance(mask, dict):
        found = [edges for edges in map(block_edges, mask.values()) if edges is not None]
        if not found:
            return None
        return tuple(torch.stack(parts).any(0) for parts in zip(*found))  # type: ignore[return-value]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[2] < 2:
        return None
    queries, keys = mask.shape[2], mask.shape[3]
    # Query i is token keys - queries + i of the keys (a dynamic cache's mask has no empty slots).
    first = keys - queries
    opens = visible(mask[:, 0, 0, first + 1])
    closes = visible(mask[:, 0, queries - 2, keys - 1])
    return opens, closes
