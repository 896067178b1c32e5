"""Which prompt tokens are image or video placeholders, read off the token ids and the model's config.

Vision-language processors expand each image (video) into as many placeholder tokens as the vision
encoder yields features, all with one id the model's config names (``image_token_id`` or
``image_token_index``; ``video_token_id`` / ``video_token_index``); the model overwrites their
embeddings with the vision features. A prompt token is therefore an image/video token exactly when
its id is one of those. Delimiters such as ``<vision_start>`` or Gemma 3's ``boi`` token are text.
"""

from __future__ import annotations

import torch

#: Config fields naming the placeholder id of image and video features (names differ by family).
MEDIA_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def media_token_ids(config: object) -> tuple[int, ...]:
    """The ids of the image and video placeholder tokens of a model config; empty for text-only models."""
    found = {getattr(config, name, None) for name in MEDIA_TOKEN_FIELDS}
    return tuple(sorted(token for token in found if isinstance(token, int) and not isinstance(token, bool)))


def media_token_mask(config: object, input_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, seq_len)`` bool, True where ``input_ids`` holds an image or video placeholder token."""
    ids = media_token_ids(config)
    if not ids:
        return torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
