"""Per-(batch, KV head) variable-length KV cache storage and the attention that reads it.

Typical use (a press does this for you)::

    layer = CompressedLayer.from_selection(keys, values, indices, lengths)
    cache.layers[layer_idx] = layer
    with compressed_attention(model):
        model.generate(..., past_key_values=cache)
"""

from mmshiftkv.cache.attention import compressed_flash_varlen, compressed_sdpa, tail_visibility
from mmshiftkv.cache.compressed_layer import CompressedLayer, RowBucket, bucket_rows
from mmshiftkv.cache.context import ATTENTION_PREFIX, compressed_attention, decoder_of

__all__ = [
    "ATTENTION_PREFIX",
    "CompressedLayer",
    "RowBucket",
    "bucket_rows",
    "compressed_attention",
    "compressed_flash_varlen",
    "compressed_sdpa",
    "decoder_of",
    "tail_visibility",
]
