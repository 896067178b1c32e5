"""Bounded records for tests and analysis: an engine left running keeps only the most recent ones."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class RecentRecords(OrderedDict, Generic[K, V]):
    """A dict that keeps the ``limit`` keys added last: adding one more drops the oldest.

    Parameters
    ----------
    limit : int
        Most keys held at once.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        if len(self) > self.limit:
            self.popitem(last=False)

    def __reduce__(self):
        # Picklable (vLLM sends worker results across processes): rebuilt with its limit, then its items.
        return type(self), (self.limit,), None, None, iter(self.items())
