"""Per-(batch, KV head) variable-length KV cache storage and the attention that reads it.

Typical use (a press does this for you)::

    layer = CompressedLayer.from_selection(keys, values, indices, lengths)
    cache.layers[layer_idx] = layer
    with compressed_attention(model):
        model.generate(..., **cache_argument(model, cache))
"""

from mmshiftkv.cache.attention import compressed_flash_varlen, compressed_sdpa, tail_visibility
from mmshiftkv.cache.compat import cache_argument, crop_to, returned_cache
from mmshiftkv.cache.compressed_layer import CompressedLayer, RowBucket, bucket_rows
from mmshiftkv.cache.context import ATTENTION_PREFIX, compressed_attention, find_cache
from mmshiftkv.cache.guard import GuardedCache, guard_cache

__all__ = [
    "ATTENTION_PREFIX",
    "CompressedLayer",
    "GuardedCache",
    "RowBucket",
    "bucket_rows",
    "cache_argument",
    "crop_to",
    "compressed_attention",
    "compressed_flash_varlen",
    "compressed_sdpa",
    "find_cache",
    "guard_cache",
    "returned_cache",
    "tail_visibility",
]
