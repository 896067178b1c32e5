"""Shared fixtures: tiny models of every family, their inputs and synthetic images."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from mmshiftkv.models.tiny import (
    FAMILIES,
    NEW_TEXT_FAMILIES,
    NEW_VISION_FAMILIES,
    VISION_FAMILIES,
    build_tiny_model,
)

#: Every tiny family a press compresses: the structural contract tests run over all of them.
ALL_VISION_FAMILIES = VISION_FAMILIES + NEW_VISION_FAMILIES
ALL_FAMILIES = FAMILIES + NEW_VISION_FAMILIES + NEW_TEXT_FAMILIES

QUESTION = "What is written in the picture, and which colour is the third box?"


def synthetic_image(seed: int = 0, size: tuple[int, int] = (112, 84)) -> Image.Image:
    """A deterministic noisy RGB image with a few flat rectangles."""
    rng = np.random.RandomState(seed)
    pixels = (rng.rand(size[1], size[0], 3) * 255).astype("uint8")
    for _ in range(3):
        x, y = rng.randint(0, size[0] - 20), rng.randint(0, size[1] - 20)
        pixels[y : y + 16, x : x + 16] = rng.randint(0, 255, size=3)
    return Image.fromarray(pixels)


@functools.cache
def tiny(family: str, attn: str = "sdpa"):
    """Cached tiny model + processor (fp32, eval mode)."""
    return build_tiny_model(family, attn_implementation=attn)


def make_inputs(family: str, processor, questions: list[str], image_seeds: list[int] | None = None) -> dict:
    """Processor inputs for one prompt per question (one image each for VLMs), left padded."""
    if family not in ALL_VISION_FAMILIES:
        processor.padding_side = "left"
        return dict(processor(questions, return_tensors="pt", padding=True))
    image_seeds = image_seeds or list(range(len(questions)))
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in questions
    ]
    # One list of images per prompt: every processor accepts it (SmolVLM and Gemma 3 require it).
    images = [[synthetic_image(seed)] for seed in image_seeds]
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=VISION_FAMILIES)
def vision_family(request) -> str:
    return request.param


def greedy(model, inputs: dict, max_new_tokens: int = 5) -> torch.Tensor:
    """Greedy generation of the new tokens only."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]
