"""Budget allocators: how many prompt tokens each (layer, KV head) keeps; a press decides which."""

from mmshiftkv.allocators.ada import AdaAllocator
from mmshiftkv.allocators.base import Allocator
from mmshiftkv.allocators.head_scores import (
    check_head_score_shape,
    head_score_table,
    load_head_scores,
    save_head_scores,
)
from mmshiftkv.allocators.layer_budgets import LayerBudgetAllocator, QueryBlock
from mmshiftkv.allocators.meda import MEDAAllocator
from mmshiftkv.allocators.pyramid import PyramidAllocator
from mmshiftkv.allocators.sparsemm import SparseMMAllocator
from mmshiftkv.allocators.uniform import UniformAllocator
from mmshiftkv.allocators.vlcache import VLCacheAllocator

__all__ = [
    "AdaAllocator",
    "Allocator",
    "LayerBudgetAllocator",
    "MEDAAllocator",
    "PyramidAllocator",
    "QueryBlock",
    "SparseMMAllocator",
    "UniformAllocator",
    "VLCacheAllocator",
    "check_head_score_shape",
    "head_score_table",
    "load_head_scores",
    "save_head_scores",
]
