"""Presses: which prompt tokens each KV head keeps after prefill (by name: :mod:`mmshiftkv.registry`)."""

from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.errors import CompressionSkippedWarning, PressUsageError, UnsupportedCacheError
from mmshiftkv.presses.expected_attention import ExpectedAttentionPress
from mmshiftkv.presses.external_scorer import BudgetPress, ExternalScorerPress
from mmshiftkv.presses.full_kv import FullKVPress
from mmshiftkv.presses.keydiff import KeyDiffPress
from mmshiftkv.presses.last_attn import LastAttnPress
from mmshiftkv.presses.lookm import LookMPress
from mmshiftkv.presses.mixkv import MixKVPress
from mmshiftkv.presses.selection import select_kept_indices
from mmshiftkv.presses.shiftkv import ShiftKVPress
from mmshiftkv.presses.snapkv import SnapKVPress
from mmshiftkv.presses.state import CompressionStats, ScoringState
from mmshiftkv.presses.streaming_llm import StreamingLLMPress
from mmshiftkv.presses.vlcache import VLCachePress

__all__ = [
    "BudgetPress",
    "BudgetedPress",
    "CompressionSkippedWarning",
    "CompressionStats",
    "ExpectedAttentionPress",
    "ExternalScorerPress",
    "FullKVPress",
    "KeyDiffPress",
    "LastAttnPress",
    "LookMPress",
    "MixKVPress",
    "PressUsageError",
    "ScoringState",
    "ShiftKVPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "UnsupportedCacheError",
    "VLCachePress",
    "select_kept_indices",
]
