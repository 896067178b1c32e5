"""Presses and allocators built by name (mmshiftkv.registry), as the command lines and benchmarks do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmshiftkv.allocators import AdaAllocator, PyramidAllocator, SparseMMAllocator, UniformAllocator
from mmshiftkv.presses import FullKVPress, ShiftKVPress, SnapKVPress
from mmshiftkv.registry import make_allocator, make_press


def test_make_press_with_each_allocator(tmp_path: Path) -> None:
    assert type(make_press("full")) is FullKVPress
    press = make_press("shiftkv", budget=64, allocator=make_allocator("pyramid", window=8))
    assert type(press) is ShiftKVPress and press.budget == 64
    assert type(press.allocator) is PyramidAllocator and press.allocator.window == 8
    assert type(make_press("snapkv", budget=64, allocator="uniform").allocator) is UniformAllocator
    assert type(make_press("snapkv", budget=64, allocator="ada").allocator) is AdaAllocator
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"0-0": [1.0], "0-1": [2.0]}))
    press = make_press("snapkv", budget=64, allocator=make_allocator("sparsemm", head_scores=str(scores)))
    assert type(press) is SnapKVPress and type(press.allocator) is SparseMMAllocator
    with pytest.raises(ValueError, match="budget"):
        make_press("snapkv")
