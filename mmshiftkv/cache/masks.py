"""Padding and visibility read off the attention mask a decoder receives, whatever its form.

The readers behind :class:`~mmshiftkv.presses.state.ScoringState`'s ``key_mask`` and ``visibility``;
:func:`~mmshiftkv.cache.attention.visible` turns each mask's values into booleans.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mmshiftkv.cache.attention import visible


def padding_mask(mask: object) -> torch.Tensor | None:
    """``(batch, kv_len)`` bool of real keys from the mask a decoder receives, or None without padding.

    The decoder may receive a 2-D padding mask, a 4-D mask (boolean, True = visible, or additive,
    0 = visible), or a dict of those per layer type (transformers >= 5.2 pre-builds them in
    ``generate``; Gemma 3 always does). Keys the last query of the widest mask may not see are
    padding (under left padding the last token is real and sees every real key; a sliding-window
    mask, narrower, says nothing about padding).
    """
    real = last_row_visibility(mask)
    return None if real is None or bool(real.all()) else real


def last_row_visibility(mask: object) -> torch.Tensor | None:
    """``(batch, kv_len)`` bool: the keys the last query of the widest mask sees (2-D: the mask itself)."""
    if isinstance(mask, dict):
        return _widest(last_row_visibility(value) for value in mask.values())
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.ndim == 2:
        return mask.bool()
    if mask.ndim == 4:
        # At prefill the keys are the queries; further columns are empty slots of a static cache.
        return visible(mask[:, 0, -1, : mask.shape[2]])
    return None


def _widest(found: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """Of several layer types' visibilities, the one that lets the most keys be seen."""
    candidates = [m for m in found if m is not None]
    return max(candidates, key=lambda m: int(m.sum())) if candidates else None


#: Prompt queries whose visibility rows a press may need (SnapKV's default window is 32).
VISIBILITY_ROWS = 64


def last_rows(mask: object, rows: int = VISIBILITY_ROWS) -> torch.Tensor | None:
    """``(batch, rows, kv_len)`` bool visibility of the last query rows of the widest 4-D mask, or None.

    Only masks that are not plain causal matter (bidirectional image blocks); a 2-D padding mask or
    no mask means causal attention, which the presses apply themselves.
    """
    if isinstance(mask, dict):
        return _widest(last_rows(value, rows) for value in mask.values())
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        return None
    seen = visible(mask[:, 0, -rows:, : mask.shape[2]])
    q_len, kv_len = seen.shape[1], seen.shape[2]
    query_index = torch.arange(kv_len - q_len, kv_len, device=seen.device)
    beyond_causal = torch.arange(kv_len, device=seen.device)[None, :] > query_index[:, None]
    return seen if bool((seen & beyond_causal).any()) else None


def query_rows(mask: object, start: int, stop: int) -> torch.Tensor | None:
    """``(batch, stop - start, kv_len)`` bool visibility of prompt queries ``[start, stop)``, or None.

    Read off the widest 4-D mask (of a dict: the layer type whose last query sees the most keys, as
    :func:`padding_mask` picks), so image tokens that attend bidirectionally (Gemma 3) keep their
    rows. None when the decoder got no 4-D mask: attention is then plain causal over the real keys.
    """
    if isinstance(mask, dict):
        candidates = [m for m in mask.values() if isinstance(m, torch.Tensor) and m.ndim == 4]
        if not candidates:
            return None
        mask = max(candidates, key=lambda m: int(visible(m[:, 0, -1, : m.shape[2]]).sum()))
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        return None
    return visible(mask[:, 0, start:stop, : mask.shape[2]])
