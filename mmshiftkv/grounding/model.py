"""The grounding model: a small Qwen2.5-VL (real HF classes, M-RoPE) and its offline processor.

The text decoder (width 64) has 4 layers of 4 query heads sharing 2 KV heads (head_dim 16) with
M-RoPE (``mrope_section=[2, 3, 3]``, base 10000): each image token has a (time, row, column)
position. The vision tower has 2 blocks of width 64, 14-pixel patches merged 2x2 (one image token
per 28-pixel grid cell). About 0.5M parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLVideoProcessor,
)

from mmshiftkv.generation import quiet_weight_loading
from mmshiftkv.grounding.data import GridSpec
from mmshiftkv.tokenization import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL, build_tokenizer, qwen_vl_token_ids

#: The torchvision image processor the checkpoint was saved with. Releases that dropped the ``Fast``
#: suffix (and deprecate the old name) call it ``Qwen2VLImageProcessor`` and the PIL one
#: ``Qwen2VLImageProcessorPil``; before (transformers 5.2), ``Qwen2VLImageProcessor`` is the PIL one.
IMAGE_PROCESSOR = (
    transformers.Qwen2VLImageProcessor
    if hasattr(transformers, "Qwen2VLImageProcessorPil")
    else transformers.Qwen2VLImageProcessorFast
)
#: What the model writes before every answer. A press compresses the cache at the end of prefill,
#: and the prefill forward itself, with the whole cache, already produces the first answer token: the
#: lead-in makes every symbol the model answers come from decoding steps on the compressed cache.
ANSWER_PREFIX = "Answer: "
#: Where the trained weights and processor ship, inside the package.
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"

TEXT_CONFIG: dict = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3]},
)
VISION_CONFIG: dict = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    out_hidden_size=64,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
)


def prompt_text(processor: Qwen2_5_VLProcessor, question: str) -> str:
    """The chat prompt of one image followed by ``question``, ending where the answer starts."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def build_processor(grid: GridSpec | None = None) -> Qwen2_5_VLProcessor:
    """The Qwen2.5-VL processor with a byte-level tokenizer, fixed to ``grid``'s image size.

    ``min_pixels = max_pixels = width * height`` so the grid images are never resized and every
    cell stays one merged image token.
    """
    width, height = (grid or GridSpec()).size
    tokenizer = build_tokenizer(QWEN_SPECIAL, QWEN_CHAT_TEMPLATE)
    image_processor = IMAGE_PROCESSOR(min_pixels=width * height, max_pixels=width * height)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_model(processor: Qwen2_5_VLProcessor, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A freshly initialised grounding model whose vocabulary matches ``processor``'s tokenizer."""
    tokenizer = processor.tokenizer
    token_ids = qwen_vl_token_ids(tokenizer)
    # The text config's own bos/eos default to Qwen's 151643/151645, outside this vocabulary.
    text_ids = dict(bos_token_id=None, eos_token_id=token_ids["eos_token_id"])
    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT_CONFIG, vocab_size=len(tokenizer), **text_ids),
        vision_config=VISION_CONFIG,
        **token_ids,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = token_ids["eos_token_id"]
    model.generation_config.pad_token_id = token_ids["pad_token_id"]
    return model


def load_grounding_model(
    path: str | os.PathLike = CHECKPOINT_DIR, attn_implementation: str = "sdpa"
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """The trained grounding model (float32, eval mode) and its processor, from a local folder.

    Parameters
    ----------
    path : str or PathLike, default=CHECKPOINT_DIR
        A folder written by ``save_pretrained`` (the shipped checkpoint by default).
    attn_implementation : str, default="sdpa"
        ``"sdpa"`` or ``"eager"``.
    """
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no trained grounding model in {path}: train one with `python -m mmshiftkv.grounding.train`"
        )
    # A 2 MB local model loads at once: its per-tensor progress bar would only bury the output.
    with quiet_weight_loading():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True
        )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor
