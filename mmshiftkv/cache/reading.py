"""Who may read a compressed cache right now, per thread.

:func:`mmshiftkv.cache.compressed_attention` records, in the running thread only, which model's
forward is running inside it and which of its attention layers is running; a
:class:`~mmshiftkv.cache.CompressedLayer` (and a cache holding one, :mod:`mmshiftkv.cache.guard`)
asks :func:`reading_model` before it lets anything change it.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import nn


class _Reading(threading.local):
    """Per thread: the models whose compressed attention is running and the caches their layers were given.

    Attributes
    ----------
    model : nn.Module or None
        The model whose attention layer is running (set around each attention layer's call).
    forwards : list of nn.Module
        The models inside ``compressed_attention`` whose forward (the model, its decoder, or a module
        between the two) is running, innermost last: it covers the decoder's layers that hold no KV
        (linear attention), which change a hybrid cache before the first attention layer runs.
    contexts : int
        How many ``compressed_attention`` contexts are open in this thread (code that drives a layer
        directly, like a benchmark, runs inside one).
    caches : dict
        Per attention module running in this thread, the cache among its arguments.
    """

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.forwards: list[nn.Module] = []
        self.contexts = 0
        self.caches: dict[nn.Module, Any] = {}


#: Per thread, which model's mmshiftkv attention is reading a cache right now.
READING = _Reading()


def reading_model() -> nn.Module | None:
    """The model whose compressed attention runs in this thread now (its attention layer or its forward)."""
    if READING.model is not None:
        return READING.model
    return READING.forwards[-1] if READING.forwards else None
