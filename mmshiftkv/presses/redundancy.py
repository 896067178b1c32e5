"""MixKV redundancy scores: how alike a KV head's keys (and values) are, per layer and KV head.

The format of the reference repository (xuyang-liu16/MixKV ``visual_head/head_score/
qwen_kv_similarity.json``): a JSON object mapping ``"<layer>-<kv head>-key"`` and
``"<layer>-<kv head>-value"`` to a list of floats, one per calibration prompt, e.g.
``{"0-0-key": [0.98, 0.97], "0-0-value": [0.41, 0.39], ...}``. A head's redundancy is the mean of
its ``key`` list (the reference reads the ``value`` lists and drops them; so does
:class:`~mmshiftkv.presses.MixKVPress`). Heads are KV heads and layers are the layers that hold a
KV cache, in order; the ``key`` entries must cover the full grid.

Each float is a head's mean pairwise cosine similarity over one prompt,
:func:`mean_pairwise_cosine`; ``mmshiftkv calibrate MODEL OUT.json --scores redundancy``
(:func:`mmshiftkv.evaluation.redundancy.compute_redundancy_scores`) writes a file for any
supported model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import torch

from mmshiftkv.allocators.head_scores import HeadScoreSource, check_full_grid, float_list, read_score_mapping
from mmshiftkv.presses.keydiff import mean_direction

RedundancySource = HeadScoreSource

_KEY = re.compile(r"^(\d+)-(\d+)-(key|value)$")
_LAYOUT = '"layer-head-key" / "layer-head-value": [floats]'


def mean_pairwise_cosine(vectors: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity over all pairs of distinct real tokens, per (sample, head).

    With ``mu`` the mean of the ``N`` L2-normalised vectors, the sum of the ``N (N - 1)`` pairwise
    cosines is ``N^2 ||mu||^2 - N``, so the mean is ``(N ||mu||^2 - 1) / (N - 1)`` (the reference's
    ``calcul_similarity_score``, computed there and left unused). A single token gives 0.

    Parameters
    ----------
    vectors : torch.Tensor
        ``(batch, heads, seq_len, dim)`` keys or values.
    key_mask : torch.Tensor, optional
        ``(batch, seq_len)`` bool, True for real tokens (None: all real).

    Returns
    -------
    torch.Tensor
        ``(batch, heads)`` float32.
    """
    batch, _, seq_len, _ = vectors.shape
    mu = mean_direction(vectors, key_mask)[:, :, 0]
    if key_mask is None:
        count = torch.full((batch, 1), float(seq_len), device=vectors.device)
    else:
        count = key_mask.float().sum(-1, keepdim=True)
    # In [-1 / (N - 1), 1] exactly; the clamp only removes rounding beyond 1 (N identical directions).
    return ((count * mu.square().sum(-1) - 1) / (count - 1).clamp(min=1)).clamp(-1, 1)


def load_redundancy_scores(source: RedundancySource) -> dict[str, list[float]]:
    """Read and validate redundancy scores from a JSON file (MixKV format) or an in-memory mapping.

    Returns
    -------
    dict[str, list[float]]
        ``"layer-head-key"`` / ``"layer-head-value"`` -> per-prompt floats, ordered by (layer, head).

    Raises
    ------
    ValueError
        If a key is not ``"<layer>-<head>-key"`` or ``"<layer>-<head>-value"``, a list is empty or
        holds a value outside ``[-1, 1]`` (a mean cosine similarity), or the ``key`` entries do not
        cover a full ``layers x heads`` grid.
    """
    raw, where = read_score_mapping(source, "redundancy scores", "redundancy file", _LAYOUT)
    parsed: dict[tuple[int, int, str], list[float]] = {}
    for key, values in raw.items():
        match = _KEY.match(str(key))
        if match is None:
            raise ValueError(
                f'{where}: key {key!r} is not of the form "<layer>-<head>-key" or "<layer>-<head>-value"'
            )
        floats = float_list(where, key, values)
        bad = [v for v in floats if not (math.isfinite(v) and -1 <= v <= 1)]
        if bad:
            raise ValueError(f"{where}: {key!r} holds {bad[0]!r}, not a cosine similarity in [-1, 1]")
        parsed[int(match[1]), int(match[2]), match[3]] = floats
    check_full_grid(where, {(layer, head) for layer, head, kind in parsed if kind == "key"}, suffix="-key")
    return {f"{layer}-{head}-{kind}": parsed[layer, head, kind] for layer, head, kind in sorted(parsed)}


def redundancy_table(scores: Mapping[str, Sequence[float]]) -> torch.Tensor:
    """Per-(layer, KV head) key redundancy, the mean of each ``key`` list, ``(n_layers, kv_heads)`` float32.

    ``scores`` as returned by :func:`load_redundancy_scores`. The mean is taken in Python floats
    and stored in float32, as the reference's ``load_similarity_score`` does.
    """
    means = {}
    for key, values in scores.items():
        layer, head, kind = key.split("-")
        if kind == "key":
            means[int(layer), int(head)] = sum(values) / len(values)
    n_layers = 1 + max(layer for layer, _ in means)
    n_heads = 1 + max(head for _, head in means)
    return torch.tensor([[means[layer, head] for head in range(n_heads)] for layer in range(n_layers)])


def check_redundancy_shape(table: torch.Tensor, n_layers: int, n_kv_heads: int, where: str) -> None:
    """Reject redundancy scores computed for a model of another shape, naming ``where`` and both shapes."""
    if tuple(table.shape) != (n_layers, n_kv_heads):
        raise ValueError(
            f"{where}: its key entries cover {table.shape[0]} layers x {table.shape[1]} KV heads, "
            f"but the model has {n_layers} KV layers x {n_kv_heads} KV heads: "
            "the scores were computed for another model. "
            "Compute them for this model with `mmshiftkv calibrate MODEL OUT.json --scores redundancy`."
        )


def save_redundancy_scores(scores: Mapping[str, Sequence[float]], path: str | os.PathLike) -> None:
    """Validate ``scores`` (``"layer-head-key"`` / ``"-value"`` -> floats) and write them as MixKV JSON."""
    validated = load_redundancy_scores(scores)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(validated, f, indent=4)
