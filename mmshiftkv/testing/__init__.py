"""Test utilities, like ``numpy.testing``: tiny offline models of every family and their inputs.

Nothing here downloads: the models are built from configs with the real transformers classes,
tokenizers in code (:mod:`mmshiftkv.tokenization`), images and videos with NumPy/PIL. The library's
runtime modules never import this package; tests, benchmarks and scripts do::

    from mmshiftkv.testing import QUESTION, make_inputs, tiny
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])

Families: :data:`ALL_FAMILIES` are the ones a press compresses, :data:`REFUSED_FAMILIES` the ones it
refuses (built so that the refusal is tested); :func:`build_tiny_model` builds both.
"""

from mmshiftkv.testing.families import (
    ALL_FAMILIES,
    ALL_VISION_FAMILIES,
    FAMILIES,
    NEW_TEXT_FAMILIES,
    NEW_VISION_FAMILIES,
    REFUSED_FAMILIES,
    VIDEO_FAMILIES,
    VISION_FAMILIES,
)
from mmshiftkv.testing.inputs import (
    QUESTION,
    chat_inputs,
    greedy,
    greedy_under,
    make_inputs,
    make_video,
    synthetic_image,
)
from mmshiftkv.testing.models import (
    build_tiny_model,
    capture_attention_calls,
    kvpress_leftovers_removed,
    tiny,
    tiny_sharpened,
)

__all__ = [
    "ALL_FAMILIES",
    "ALL_VISION_FAMILIES",
    "FAMILIES",
    "NEW_TEXT_FAMILIES",
    "NEW_VISION_FAMILIES",
    "QUESTION",
    "REFUSED_FAMILIES",
    "VIDEO_FAMILIES",
    "VISION_FAMILIES",
    "build_tiny_model",
    "capture_attention_calls",
    "chat_inputs",
    "greedy",
    "kvpress_leftovers_removed",
    "greedy_under",
    "make_inputs",
    "make_video",
    "synthetic_image",
    "tiny",
    "tiny_sharpened",
]
