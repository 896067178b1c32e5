"""Tiny random-weight models that vLLM's CPU build can serve, saved to a folder vLLM loads offline.

:func:`mmshiftkv.testing.build_tiny_model` makes heads of 16 features; vLLM's CPU attention
kernels need at least 32. :func:`build_servable_tiny_model` takes the same families, processors
and tokenizers and widens the decoder to 4 query heads x 32 features (2 KV heads), the M-RoPE
sections of Qwen-VL scaled to match and the vision towers' outputs to the wider embedding.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from mmshiftkv.testing.models import build_tiny_model

#: Families served by the vLLM tests and benchmark: text decoders with and without a query norm
#: (Qwen3), split M-RoPE (Qwen2-VL, Qwen2.5-VL), interleaved M-RoPE with DeepStack (Qwen3-VL), and
#: a plain-RoPE vision-language model (LLaVA-OneVision: SigLIP + Qwen2).
SERVABLE_FAMILIES = ("qwen2", "qwen3", "qwen2.5-vl", "qwen2-vl", "qwen3-vl", "llava-onevision")
#: The servable families that take images.
SERVABLE_VISION_FAMILIES = ("qwen2.5-vl", "qwen2-vl", "qwen3-vl", "llava-onevision")

HEAD_DIM = 32
HIDDEN_SIZE = 128

#: Weight-name prefixes rewritten after saving, to the layout of the family's released checkpoints
#: (vLLM loads those): transformers 5.19 saves LLaVA-OneVision's SigLIP tower without its
#: ``vision_model`` level.
CHECKPOINT_PREFIXES = {"llava-onevision": ("vision_tower.", "vision_tower.vision_model.")}


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
    if family.startswith("qwen"):
        # The Qwen-VL mergers write straight into the decoder's embedding space (LLaVA's projector
        # reads the decoder width from the text config).
        if family == "qwen2-vl":
            config.vision_config.hidden_size = HIDDEN_SIZE
        elif family in ("qwen2.5-vl", "qwen3-vl"):
            config.vision_config.out_hidden_size = HIDDEN_SIZE
    section = (getattr(text, "rope_parameters", None) or {}).get("mrope_section")
    if section is not None:
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
    if family in CHECKPOINT_PREFIXES:
        old, new = CHECKPOINT_PREFIXES[family]
        weights = load_file(folder / "model.safetensors")
        renamed = {new + name[len(old) :] if name.startswith(old) else name: w for name, w in weights.items()}
        save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
