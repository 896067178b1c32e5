"""mmshiftkv: prefill-time KV cache compression for multimodal LLMs (MM-ShiftKV and baselines).

>>> from mmshiftkv import ShiftKVPress
>>> with ShiftKVPress(budget=64)(model):
...     model.generate(**inputs)

Names are imported on first use, so ``import mmshiftkv`` stays cheap. ``import mmshiftkv.pipelines``
registers the ``"kv-press-vqa"`` pipeline task with transformers (it imports transformers'
pipeline machinery, which takes seconds, so the top-level import does not).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PRESSES": "mmshiftkv.registry",
    "BudgetPress": "mmshiftkv.presses",
    "BudgetedPress": "mmshiftkv.presses",
    "CompressionSkippedWarning": "mmshiftkv.presses",
    "CompressionStats": "mmshiftkv.presses",
    "ExpectedAttentionPress": "mmshiftkv.presses",
    "ExternalScorerPress": "mmshiftkv.presses",
    "FullKVPress": "mmshiftkv.presses",
    "KeyDiffPress": "mmshiftkv.presses",
    "LastAttnPress": "mmshiftkv.presses",
    "LookMPress": "mmshiftkv.presses",
    "MixKVPress": "mmshiftkv.presses",
    "PressUsageError": "mmshiftkv.presses",
    "ScoringState": "mmshiftkv.presses",
    "ShiftKVPress": "mmshiftkv.presses",
    "SnapKVPress": "mmshiftkv.presses",
    "StreamingLLMPress": "mmshiftkv.presses",
    "UnsupportedCacheError": "mmshiftkv.presses",
    "KVPressVQAPipeline": "mmshiftkv.pipelines",
    "UnsupportedModelError": "mmshiftkv.models",
    "get_adapter": "mmshiftkv.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmshiftkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
