"""Tiny random-weight models of every supported family, built offline from configs.

They use the real transformers model, processor and image-processor classes with a byte-level
tokenizer built in code, so tests, benchmarks and the demo run without downloading anything.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

QWEN_SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL = ["<s>", "</s>", "<image>"]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: Decoder sizes shared by every tiny model: 2 layers, 4 query heads sharing 2 KV heads (GQA).
TEXT_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

FAMILIES = ("qwen2.5-vl", "qwen2-vl", "llava-next", "llava", "llama", "qwen2", "qwen3", "mistral")
VISION_FAMILIES = ("qwen2.5-vl", "qwen2-vl", "llava-next", "llava")


def build_tokenizer(special_tokens: list[str], chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every string encodes, no merges) with ``special_tokens`` first."""
    byte_chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(special_tokens + ["<pad>"] + byte_chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", chat_template=chat_template
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    return tokenizer


def qwen_vl_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The special-token ids a Qwen2-VL / Qwen2.5-VL config names, for a :data:`QWEN_SPECIAL` tokenizer."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tokenizer.pad_token_id,
    )


def _qwen_vl(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(QWEN_SPECIAL, QWEN_CHAT_TEMPLATE)
    text = dict(
        TEXT_SIZES,
        vocab_size=len(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(
        depth=1, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2
    )
    common = dict(text_config=text, **qwen_vl_token_ids(tokenizer))
    if family == "qwen2.5-vl":
        config = Qwen2_5_VLConfig(
            vision_config=dict(
                vision, intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[0], window_size=56
            ),
            **common,
        )
        model_cls, processor_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    else:
        config = Qwen2VLConfig(
            vision_config=dict(vision, embed_dim=32, mlp_ratio=2, hidden_size=64), **common
        )
        model_cls, processor_cls = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    config._attn_implementation = attn_implementation
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = processor_cls(
        image_processor=image_processor,
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model_cls(config), processor


def _llava(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(LLAVA_SPECIAL, LLAVA_CHAT_TEMPLATE)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(TEXT_SIZES, model_type="llama", vocab_size=len(tokenizer))
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    crop = {"height": 28, "width": 28}
    if family == "llava-next":
        pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_token,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
        )
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": 28}, crop_size=crop, image_grid_pinpoints=pinpoints
        )
        model_cls, processor_cls = LlavaNextForConditionalGeneration, LlavaNextProcessor
    else:
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=image_token, vision_feature_layer=-1
        )
        image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=crop)
        model_cls, processor_cls = LlavaForConditionalGeneration, LlavaProcessor
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model_cls(config), processor


def _text(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(["<s>", "</s>"], LLAVA_CHAT_TEMPLATE)
    sizes = dict(TEXT_SIZES, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    config = config_cls(**sizes)
    config._attn_implementation = attn_implementation
    return model_cls(config), tokenizer


def build_tiny_model(
    family: str, attn_implementation: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """A tiny random-weight model of ``family`` and its processor (tokenizer for text models).

    Parameters
    ----------
    family : str
        One of :data:`FAMILIES`.
    attn_implementation : str, default="sdpa"
        ``"sdpa"`` or ``"eager"``.
    seed : int, default=0
        Seed of the random weights (the global RNG state is restored afterwards).
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(FAMILIES)}")
    builder = (
        _qwen_vl
        if family.startswith("qwen2") and family.endswith("vl")
        else (_llava if family.startswith("llava") else _text)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builder(family, attn_implementation)
    return model.to(dtype).eval(), processor
