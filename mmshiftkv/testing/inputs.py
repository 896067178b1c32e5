"""Inputs for the tiny models: synthetic images and videos, left-padded chat batches, greedy tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mmshiftkv.generation import encode_messages, user_turn
from mmshiftkv.testing.families import ALL_VISION_FAMILIES

#: The question the tests ask about a synthetic image (long enough to exceed small budgets).
QUESTION = "What is written in the picture, and which colour is the third box?"


def synthetic_image(seed: int = 0, size: tuple[int, int] = (112, 84)) -> Image.Image:
    """A deterministic noisy RGB image with a few flat rectangles."""
    rng = np.random.RandomState(seed)
    pixels = (rng.rand(size[1], size[0], 3) * 255).astype("uint8")
    for _ in range(3):
        x, y = rng.randint(0, size[0] - 20), rng.randint(0, size[1] - 20)
        pixels[y : y + 16, x : x + 16] = rng.randint(0, 255, size=3)
    return Image.fromarray(pixels)


def make_video(seed: int = 0, frames: int = 4, size: tuple[int, int] = (56, 56)) -> np.ndarray:
    """A deterministic synthetic video: ``frames`` noisy RGB frames of ``size`` (width, height).

    Returns
    -------
    np.ndarray
        uint8 array of shape (frames, height, width, 3), the layout every video processor accepts.
    """
    rng = np.random.RandomState(seed)
    width, height = size
    video = (rng.rand(frames, height, width, 3) * 255).astype("uint8")
    # A box that moves between frames, so frames are not interchangeable.
    for t in range(frames):
        x = (4 * t) % max(width - 16, 1)
        video[t, 8:24, x : x + 16] = rng.randint(0, 255, size=3)
    return video


def chat_inputs(
    processor: Any,
    questions: list[str],
    images: list[Any] | None = None,
    videos: list[Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for one user turn per question, each with its own image or video.

    The turns are encoded by :func:`mmshiftkv.generation.encode_messages` (one image list per prompt).

    Parameters
    ----------
    processor : ProcessorMixin or PreTrainedTokenizerBase
        What :func:`build_tiny_model` returned; a tokenizer takes the questions as plain text.
    questions : list of str
        One prompt per question.
    images, videos : list, optional
        One PIL image (e.g. :func:`synthetic_image`) / one video (see :func:`make_video`) per question;
        at most one of the two.

    Returns
    -------
    dict of str to torch.Tensor
        The processor's outputs: ``input_ids`` and ``attention_mask`` of shape (batch, seq), plus the
        family's pixel tensors. Llama 4's processor returns bfloat16 pixel values.
    """
    if images is not None and videos is not None:
        raise ValueError("pass images or videos, not both")
    media = images if images is not None else videos
    if media is not None and len(media) != len(questions):
        raise ValueError(f"{len(media)} images/videos for {len(questions)} questions: pass one per question")
    if isinstance(processor, PreTrainedTokenizerBase):
        if media is not None:
            raise ValueError("a tokenizer takes no images or videos")
        processor.padding_side = "left"
        return dict(processor(questions, return_tensors="pt", padding=True))
    conversations = [
        user_turn(question, image=images[i] if images else None, video=videos[i] if videos else None)
        for i, question in enumerate(questions)
    ]
    # One list per prompt: SmolVLM and Gemma 3 refuse a flat list for a batch, every family takes this.
    return encode_messages(processor, conversations, images_per_prompt=True)


def make_inputs(
    family: str, processor: Any, questions: list[str], image_seeds: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """:func:`chat_inputs` for a tiny model of ``family``: one :func:`synthetic_image` per question
    for a vision-language family (seeds ``image_seeds``, default ``0, 1, ...``), plain text otherwise."""
    images = None
    if family in ALL_VISION_FAMILIES:
        images = [synthetic_image(seed) for seed in image_seeds or range(len(questions))]
    return chat_inputs(processor, questions, images=images)


def greedy(model: Any, inputs: dict, max_new_tokens: int = 5) -> torch.Tensor:
    """Greedy generation of the new tokens only."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def greedy_under(press: Any, model: Any, inputs: dict, max_new_tokens: int = 2) -> torch.Tensor | None:
    """:func:`greedy` under ``press`` (its warnings silenced), or None where the press refuses the cache.

    A press refuses, by name, a model-specific cache class that is not a transformers ``Cache``
    (Qwen3.5 on transformers 5.2); None is returned only after checking that plain ``generate`` indeed
    returns such a cache, so a refusal of a supported cache still fails the caller.
    """
    import warnings

    from mmshiftkv.cache import returned_cache
    from mmshiftkv.presses import UnsupportedCacheError

    try:
        with press(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return greedy(model, inputs, max_new_tokens=max_new_tokens)
    except UnsupportedCacheError:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        if returned_cache(out) is not None:
            raise
        return None
