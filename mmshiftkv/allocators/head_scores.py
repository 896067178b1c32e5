"""SparseMM visual-head score files.

The format of the reference repository (CR400AF-A/SparseMM ``visual_head/head_score/*.json``):
a JSON object mapping ``"<layer>-<query head>"`` to a list of floats, one per calibration image,
e.g. ``{"0-0": [0.0, 0.0006], "0-1": [...], ...}``. A head's score is the mean of its list. Keys
are query heads (not KV heads) and must cover the full ``n_layers x n_heads`` grid.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection, Mapping, Sequence

import torch

HeadScoreSource = str | os.PathLike | Mapping[str, Sequence[float]]

_KEY = re.compile(r"^(\d+)-(\d+)$")


def read_score_mapping(
    source: HeadScoreSource, in_memory: str, file_label: str, layout: str
) -> tuple[Mapping, str]:
    """The mapping held by ``source`` (itself, or the JSON object of the file it names) and its name.

    Shared by the score files of the reference repositories (SparseMM head scores here, MixKV
    redundancy scores in :mod:`mmshiftkv.presses.redundancy`). ``in_memory`` names a mapping in
    messages, ``file_label`` a file (followed by its path), ``layout`` the expected content.

    Raises
    ------
    ValueError
        If the file is not JSON or does not hold a JSON object.
    """
    if isinstance(source, Mapping):
        return source, in_memory
    where = f"{file_label} {os.fspath(source)!r}"
    with open(source, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{where} is not JSON ({error}); it must hold an object of {layout}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must hold a JSON object of {layout}, got {type(raw).__name__}")
    return raw, where


def float_list(where: str, key: object, values: object) -> list[float]:
    """``values`` as a non-empty list of floats, or a ValueError naming ``where`` and ``key``."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{where}: {key!r} must map to a non-empty list of floats, got {values!r}")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {key!r} must map to a list of floats ({error})") from None


def load_head_scores(source: HeadScoreSource) -> dict[str, list[float]]:
    """Read and validate head scores from a JSON file or an in-memory mapping.

    Parameters
    ----------
    source : str, os.PathLike or Mapping
        Path of a JSON file in the SparseMM format, or the already-loaded mapping.

    Returns
    -------
    dict[str, list[float]]
        ``"layer-head"`` -> per-image scores, ordered by (layer, head).

    Raises
    ------
    ValueError
        If a key is not ``"<layer>-<head>"``, a list is empty or holds a negative / non-finite
        value, or the keys do not cover a full ``layers x heads`` grid.
    """
    raw, where = read_score_mapping(source, "head scores", "head-score file", '"layer-head": [floats]')
    parsed: dict[tuple[int, int], list[float]] = {}
    for key, values in raw.items():
        match = _KEY.match(str(key))
        if match is None:
            raise ValueError(f'{where}: key {key!r} is not of the form "<layer>-<head>"')
        floats = float_list(where, key, values)
        bad = [v for v in floats if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ValueError(f"{where}: {key!r} holds a negative or non-finite score: {bad[0]!r}")
        index = (int(match[1]), int(match[2]))
        if index in parsed:
            raise ValueError(f"{where}: layer {index[0]} head {index[1]} appears twice")
        parsed[index] = floats

    check_full_grid(where, parsed)
    return {f"{layer}-{head}": parsed[layer, head] for layer, head in sorted(parsed)}


def check_full_grid(where: str, indices: Collection[tuple[int, int]], suffix: str = "") -> None:
    """Raise a ValueError naming ``where`` unless the ``(layer, head)`` indices fill a full grid.

    The grid is ``1 + max layer`` by ``1 + max head``; missing entries are named as their keys,
    ``"<layer>-<head>"`` followed by ``suffix``.
    """
    if not indices:
        raise ValueError(f"{where} is empty")
    n_layers = 1 + max(layer for layer, _ in indices)
    n_heads = 1 + max(head for _, head in indices)
    missing = [
        f"{layer}-{head}{suffix}"
        for layer in range(n_layers)
        for head in range(n_heads)
        if (layer, head) not in indices
    ]
    if missing:
        raise ValueError(
            f"{where} does not cover a full {n_layers} layers x {n_heads} heads grid: "
            f"{len(missing)} missing, e.g. {missing[:3]}"
        )


def head_score_table(scores: Mapping[str, Sequence[float]]) -> torch.Tensor:
    """Per-head mean scores as a table.

    Parameters
    ----------
    scores : Mapping
        Validated scores, as returned by :func:`load_head_scores`.

    Returns
    -------
    torch.Tensor
        ``(n_layers, n_heads)`` float64, the mean of each head's list.
    """
    table = {tuple(int(i) for i in key.split("-")): sum(v) / len(v) for key, v in scores.items()}
    overflowing = [key for key, mean in table.items() if not math.isfinite(mean)]
    if overflowing:
        layer, head = overflowing[0]
        raise ValueError(
            f"the scores of layer {layer} head {head} overflow float64 when averaged: rescale the head "
            "scores (only their ratios matter)"
        )
    n_layers = 1 + max(layer for layer, _ in table)
    n_heads = 1 + max(head for _, head in table)
    return torch.tensor(
        [[table[layer, head] for head in range(n_heads)] for layer in range(n_layers)], dtype=torch.float64
    )


def check_head_score_shape(table: torch.Tensor, n_layers: int, n_heads: int) -> None:
    """Reject head scores computed for a model of another shape.

    Parameters
    ----------
    table : torch.Tensor
        ``(score_layers, score_heads)`` head scores.
    n_layers, n_heads : int
        The model's decoder layers and query heads.

    Raises
    ------
    ValueError
        Naming both shapes, when they differ.
    """
    if tuple(table.shape) != (n_layers, n_heads):
        raise ValueError(
            f"head scores cover {table.shape[0]} layers x {table.shape[1]} query heads, but the model has "
            f"{n_layers} layers x {n_heads} query heads: the scores were computed for another model. "
            f"Compute scores for this model with mmshiftkv.evaluation.calibrate.compute_visual_head_scores."
        )


def save_head_scores(scores: Mapping[str, Sequence[float]] | torch.Tensor, path: str | os.PathLike) -> None:
    """Write head scores in the SparseMM JSON format.

    Parameters
    ----------
    scores : Mapping or torch.Tensor
        ``"layer-head"`` -> per-image floats, or a ``(n_images, n_layers, n_heads)`` tensor of
        per-image scores.
    path : str or os.PathLike
        Destination JSON file.
    """
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 3:
            raise ValueError(f"score tensor must be (n_images, n_layers, n_heads), got {tuple(scores.shape)}")
        per_head = scores.double().permute(1, 2, 0).tolist()
        scores = {
            f"{layer}-{head}": values for layer, row in enumerate(per_head) for head, values in enumerate(row)
        }
    validated = load_head_scores(scores)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(validated, f, indent=4)
