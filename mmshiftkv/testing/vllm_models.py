"""Tiny random-weight models that vLLM's CPU build can serve, saved to a folder vLLM loads offline.

:func:`mmshiftkv.models.tiny.build_tiny_model` makes heads of 16 features; vLLM's CPU attention
kernels need at least 32. :func:`build_servable_tiny_model` takes the same families, processors
and tokenizers and widens the decoder to 4 query heads x 32 features (2 KV heads), the M-RoPE
sections of Qwen-VL scaled to match.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from mmshiftkv.models.tiny import build_tiny_model

#: Families served by the vLLM tests and benchmark.
SERVABLE_FAMILIES = ("qwen2", "qwen2.5-vl", "qwen2-vl")

HEAD_DIM = 32
HIDDEN_SIZE = 128


def build_servable_tiny_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """A tiny model of ``family`` with 32-feature heads, and its processor (tokenizer for text models)."""
    if family not in SERVABLE_FAMILIES:
        raise ValueError(
            f"unknown servable tiny family {family!r}; choose from {', '.join(SERVABLE_FAMILIES)}"
        )
    model, processor = build_tiny_model(family, seed=seed, dtype=dtype)
    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True)
    text.hidden_size = HIDDEN_SIZE
    text.head_dim = HIDDEN_SIZE // text.num_attention_heads
    if hasattr(config, "vision_config"):
        # The vision merger writes straight into the decoder's embedding space.
        config.vision_config.out_hidden_size = HIDDEN_SIZE
        if hasattr(config.vision_config, "hidden_size") and family == "qwen2-vl":
            config.vision_config.hidden_size = HIDDEN_SIZE
        section = text.rope_parameters["mrope_section"]
        scale = (HEAD_DIM // 2) // sum(section)
        text.rope_parameters = dict(text.rope_parameters, mrope_section=[s * scale for s in section])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        widened = type(model)(config)
    return widened.to(dtype).eval(), processor


def save_servable_tiny_model(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Build :func:`build_servable_tiny_model` and save model + processor to ``folder`` (returned)."""
    folder = Path(folder)
    model, processor = build_servable_tiny_model(family, seed=seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
