"""mmshiftkv: prefill-time KV cache compression for multimodal LLMs (MM-ShiftKV and baselines).

>>> from mmshiftkv import ShiftKVPress
>>> with ShiftKVPress(budget=64)(model):
...     model.generate(**inputs)
"""

from mmshiftkv.models.adapter import SUPPORTED_FAMILIES, UnsupportedModelError, get_adapter
from mmshiftkv.pipelines import KVPressVQAPipeline
from mmshiftkv.presses import (
    PRESSES,
    BudgetedPress,
    BudgetPress,
    CompressionSkippedWarning,
    CompressionStats,
    ExpectedAttentionPress,
    FullKVPress,
    KeyDiffPress,
    LastAttnPress,
    ShiftKVPress,
    SnapKVPress,
    StreamingLLMPress,
    UnsupportedCacheError,
)

__version__ = "0.1.0"

__all__ = [
    "PRESSES",
    "SUPPORTED_FAMILIES",
    "BudgetPress",
    "BudgetedPress",
    "CompressionSkippedWarning",
    "CompressionStats",
    "ExpectedAttentionPress",
    "FullKVPress",
    "KVPressVQAPipeline",
    "KeyDiffPress",
    "LastAttnPress",
    "ShiftKVPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "UnsupportedCacheError",
    "UnsupportedModelError",
    "get_adapter",
]
