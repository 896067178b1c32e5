"""Tiny models of the first supported families: Qwen2-VL / Qwen2.5-VL, LLaVA(-NeXT), text decoders.

Each builder takes ``(family, attn_implementation)`` and returns the random-weight model with its
processor (the tokenizer for text decoders); :func:`~mmshiftkv.testing.build_tiny_model` seeds them.
"""

from __future__ import annotations

from typing import Any

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

from mmshiftkv.testing.chat_templates import LLAVA_CHAT_TEMPLATE, LLAVA_SPECIAL
from mmshiftkv.testing.families import TEXT_SIZES
from mmshiftkv.tokenization import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL, build_tokenizer, qwen_vl_token_ids


def qwen_vl(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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
        # Frames of at most 112x112 pixels: a few dozen video tokens, like the image prompts.
        video_processor=Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model_cls(config), processor


def llava(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def text_decoder(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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
