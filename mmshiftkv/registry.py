"""Presses and allocators by name: the one place where a name becomes a press or an allocator.

The command lines (``mmshiftkv eval``, ``analyze``, ``profile``, ``demo``), the benchmarks, the
grounding evaluation and the vLLM plugin all build their presses with :func:`make_press` and their
allocators with :func:`make_allocator`; a new press is one line in :data:`PRESSES`, a new allocator
one line in :data:`ALLOCATORS`.

>>> from mmshiftkv.registry import make_allocator, make_press
>>> press = make_press("shiftkv", budget=64, allocator=make_allocator("pyramid", window=8))
>>> make_press("full", budget=64)  # FullKV keeps every token: budget and allocator are ignored
FullKVPress(compression_ratio=0.0, budget=None, allocator=None)

A wrapper press (MixKV) takes its inner press by name too, with that press's own fields:

>>> mixkv = make_press("mixkv", budget=64, allocator="ada", base="shiftkv", base_fields={"gamma": 5.0})
"""

from __future__ import annotations

import dataclasses
from os import PathLike
from typing import Any

from mmshiftkv.allocators import (
    AdaAllocator,
    Allocator,
    MEDAAllocator,
    PyramidAllocator,
    SparseMMAllocator,
    UniformAllocator,
    VLCacheAllocator,
)
from mmshiftkv.allocators.head_scores import HeadScoreSource
from mmshiftkv.presses import (
    BudgetedPress,
    ExpectedAttentionPress,
    FullKVPress,
    KeyDiffPress,
    LastAttnPress,
    LookMPress,
    MixKVPress,
    ShiftKVPress,
    SnapKVPress,
    StreamingLLMPress,
    VLCachePress,
)

#: The name of the uncompressed baseline, which takes no budget.
FULL = "full"

#: Every press class by its name, as the command lines, the benchmarks and the vLLM plugin accept them.
PRESSES: dict[str, type[BudgetedPress]] = {
    FULL: FullKVPress,
    "shiftkv": ShiftKVPress,
    "snapkv": SnapKVPress,
    "streaming_llm": StreamingLLMPress,
    "keydiff": KeyDiffPress,
    "expected_attention": ExpectedAttentionPress,
    "last_attn": LastAttnPress,
    "vlcache": VLCachePress,
    "lookm": LookMPress,
    "mixkv": MixKVPress,
}

#: Every allocator class by its name; ``"uniform"`` is the paper's default (Tables 1-2).
ALLOCATORS: dict[str, type[Allocator]] = {
    "uniform": UniformAllocator,
    "pyramid": PyramidAllocator,
    "ada": AdaAllocator,
    "sparsemm": SparseMMAllocator,
    "meda": MEDAAllocator,
    "vlcache": VLCacheAllocator,
}

#: Presses whose paper pairs them with an allocator: :func:`make_press` builds that allocator (its
#: defaults) when none is given. ``make_press("vlcache", budget=64)`` is VL-Cache as published
#: (post-vision scoring + sparsity-aware layer budgets); pass ``allocator="uniform"`` for the press alone.
PAPER_ALLOCATORS: dict[str, str] = {"vlcache": "vlcache"}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def make_allocator(
    name: str,
    *,
    head_scores: HeadScoreSource | str | PathLike | None = None,
    window: int | None = None,
    **fields: Any,
) -> Allocator:
    """A fresh allocator by its :data:`ALLOCATORS` name.

    Parameters
    ----------
    name : str
        A key of :data:`ALLOCATORS`.
    head_scores : str, PathLike or Mapping, optional
        SparseMM head scores (a JSON file or the loaded mapping); required by ``"sparsemm"``, ignored
        by the allocators that take none.
    window : int, optional
        Recent-token window of the windowed allocators (pyramid, ada, sparsemm; their default, 32, if
        None); ignored by those without one.
    **fields
        Further fields of the allocator class (``floor=0.2``, ``ratio=0.1``, ...).

    Raises
    ------
    ValueError
        If ``name`` is unknown, or ``"sparsemm"`` is asked for without ``head_scores``.
    """
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; choose from {', '.join(ALLOCATORS)}")
    cls = ALLOCATORS[name]
    accepted = _fields(cls)
    if window is not None and "window" in accepted:
        fields["window"] = window
    if "head_scores" in accepted:
        if head_scores is None:
            raise ValueError(f"the {name} allocator needs a head-score file")
        fields["head_scores"] = head_scores
    return cls(**fields)


def make_press(
    name: str, *, budget: int | None = None, allocator: Allocator | str | None = None, **fields: Any
) -> BudgetedPress:
    """A fresh press by its :data:`PRESSES` name.

    Parameters
    ----------
    name : str
        A key of :data:`PRESSES`.
    budget : int, optional
        Prompt tokens kept per KV head. Required by every press but FullKV unless ``fields`` give a
        ``compression_ratio``. FullKV (``"full"``) keeps every token: its budget and allocator are
        ignored, so a grid of budgets x allocators can build it like the others.
    allocator : Allocator or str, optional
        How the budget is shared between layers and KV heads; a name is built by
        :func:`make_allocator` with its defaults. Default: the press's paper allocator
        (:data:`PAPER_ALLOCATORS`) where it has one, else ``budget`` everywhere.
    **fields
        Further fields of the press class (``window_size=8``, ``gamma=10.0``, ...). A press that wraps
        another (``"mixkv"``: its ``base``) takes it by name, ``base="shiftkv"``, built with the fields
        in ``base_fields`` and the wrapper's ``window_size`` where the inner press has one (the
        default: the wrapper's own default inner press).

    Raises
    ------
    ValueError
        If ``name`` is unknown or the press needs a budget and got none; the press class's own
        ``TypeError`` / ``ValueError`` for bad fields.
    """
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")
    if name == FULL:
        return FullKVPress(**fields)
    if budget is None and "compression_ratio" not in fields:
        raise ValueError(f"press {name!r} needs a budget")
    if allocator is None and name in PAPER_ALLOCATORS and budget is not None:
        allocator = PAPER_ALLOCATORS[name]
    if isinstance(allocator, str):
        allocator = make_allocator(allocator)
    if isinstance(fields.get("base"), str) or "base_fields" in fields:
        fields["base"] = _inner_press(name, fields.get("base"), fields.pop("base_fields", None), fields)
    return PRESSES[name](budget=budget, allocator=allocator, **fields)


def _inner_press(wrapper: str, base: str | None, base_fields: dict | None, fields: dict) -> BudgetedPress:
    """The inner press a wrapper press names (it only scores: no budget, no allocator)."""
    if "base" not in _fields(PRESSES[wrapper]):
        raise ValueError(f"press {wrapper!r} wraps no other press: base= and base_fields= do not apply")
    if not isinstance(base, str) or base not in PRESSES or base == FULL:
        choices = ", ".join(n for n in PRESSES if n not in (FULL, wrapper))
        raise ValueError(f"{wrapper}: base must name an importance press ({choices}), got {base!r}")
    inner = dict(base_fields or {})
    if "window_size" in fields and "window_size" in _fields(PRESSES[base]):
        inner.setdefault("window_size", fields["window_size"])
    return PRESSES[base](**inner)


def press_name(press: BudgetedPress) -> str:
    """The :data:`PRESSES` name of ``press``'s class."""
    for name, cls in PRESSES.items():
        if type(press) is cls:
            return name
    raise ValueError(f"{type(press).__name__} is not one of the named presses ({', '.join(PRESSES)})")
