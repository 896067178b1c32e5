"""Tiny random-weight models of every supported family, built offline from configs.

They use the real transformers model, processor and image-processor classes with a byte-level
tokenizer built in code, so tests, benchmarks and the demo run without downloading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    FuyuConfig,
    FuyuForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    GotOcr2ImageProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4Processor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
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
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Renamed from Llama4ImageProcessorFast (transformers 5.2) to Llama4ImageProcessor.
_LLAMA4_IMAGE_PROCESSOR = (
    getattr(transformers, "Llama4ImageProcessor", None) or transformers.Llama4ImageProcessorFast
)

QWEN_SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL = ["<s>", "</s>", "<image>"]


#: Decoder sizes shared by every tiny model: 2 layers, 4 query heads sharing 2 KV heads (GQA).
TEXT_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

#: Decoder sizes of the newer families: untied output embeddings, as tied random ones make greedy decoding
#: repeat the last prompt token, which hides errors.
NEW_TEXT_SIZES: dict[str, Any] = dict(TEXT_SIZES, tie_word_embeddings=False)


def chatml_template(image: str, video: str = "") -> str:
    """A ChatML (Qwen-style) chat template that writes ``image`` / ``video`` for each media part."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image}{{% elif part['type'] == 'video' %}}{video}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


QWEN_CHAT_TEMPLATE = chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
)
ONEVISION_CHAT_TEMPLATE = chatml_template("<image>\n", "<video>\n")
INTERNVL_CHAT_TEMPLATE = chatml_template("<IMG_CONTEXT>\n", "<video>\n")
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}</s>{% endif %}{% endfor %}"
)
IDEFICS_SPECIAL = [
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IDEFICS_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
GLM_SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
]
GLM_CHAT_TEMPLATE = chatml_template(
    "<|begin_of_image|><|image|><|end_of_image|>", "<|begin_of_video|><|video|><|end_of_video|>"
)
GEMMA_NAMED = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
GEMMA_SPECIAL = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"] + list(GEMMA_NAMED.values())
GEMMA_CHAT_TEMPLATE = (
    "<bos>{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
#: Gemma 3 decoder: a sliding-window layer on each side of a global one. The window (8) is far below
#: the prompt lengths so that tests cross it; the query scale (query_pre_attn_scalar) is not head_dim
#: (as in Gemma 3 27B), so code that assumes 1/sqrt(head_dim) is caught.
GEMMA3_TEXT: dict[str, Any] = dict(
    NEW_TEXT_SIZES,
    num_hidden_layers=3,
    head_dim=16,
    query_pre_attn_scalar=32,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)


def _plain_template(bos: str, turn_start: str, turn_end: str, image: str, generation: str) -> str:
    return (
        f"{bos}{{% for message in messages %}}{turn_start}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        f"{{% for part in message['content'] %}}{{% if part['type'] == 'image' %}}{image}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        f"{turn_end}{{% endfor %}}{{% if add_generation_prompt %}}{generation}{{% endif %}}"
    )


LLAMA3_CHAT_TEMPLATE = _plain_template(
    "<|begin_of_text|>", "{{ message['role'] }}: ", "<|eot_id|>", "<|image|>", "assistant: "
)
LLAMA4_CHAT_TEMPLATE = _plain_template(
    "<|begin_of_text|>", "{{ message['role'] }}: ", "<|eot|>", "<|image|>", "assistant: "
)
#: A tiny SigLIP vision tower (no pooling head), shared by the families whose encoder is SigLIP.
_SIGLIP: dict[str, Any] = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vision_use_head=False,
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: The families the press / allocator test suite runs over (its fixtures parametrize over these).
FAMILIES = ("qwen2.5-vl", "qwen2-vl", "llava-next", "llava", "llama", "qwen2", "qwen3", "mistral")
VISION_FAMILIES = ("qwen2.5-vl", "qwen2-vl", "llava-next", "llava")
#: Newer vision-language families, each built from its own transformers classes.
NEW_VISION_FAMILIES = (
    "llava-onevision",
    "internvl",
    "mistral3",
    "idefics3",
    "smolvlm",
    "qwen3-vl",
    "qwen3-vl-moe",
    "glm4v",
    "gemma3",
    "qwen3.5",
)
#: Newer text-only decoders (the language models of gemma3 / qwen3.5 alone).
NEW_TEXT_FAMILIES = ("gemma3-text", "qwen3.5-text")
#: Families whose processors take ``videos=``.
VIDEO_FAMILIES = ("qwen2.5-vl", "qwen2-vl", "qwen3-vl", "qwen3-vl-moe", "llava-onevision", "glm4v", "qwen3.5")
#: Families a per-head prompt-KV press cannot compress, built so that the refusal can be tested:
#: cross-attention layers (mllama), chunked attention + NoPE layers (llama4), fused QKV (fuyu).
REFUSED_FAMILIES = ("mllama", "llama4", "fuyu")
#: Every family :func:`build_tiny_model` builds.
ALL_FAMILIES = FAMILIES + NEW_VISION_FAMILIES + NEW_TEXT_FAMILIES + REFUSED_FAMILIES


def build_tokenizer(
    special_tokens: list[str], chat_template: str | None = None, named_tokens: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every string encodes, no merges) with ``special_tokens`` first.

    ``named_tokens`` (attribute name -> token, e.g. ``{"start_image_token": "<img>"}``) become
    attributes of the tokenizer (``tokenizer.start_image_token``, ``tokenizer.start_image_token_id``),
    as some processors read them from there; their tokens must be in ``special_tokens``.
    """
    missing = set((named_tokens or {}).values()) - set(special_tokens)
    if missing:
        raise ValueError(f"named tokens {sorted(missing)} are not in special_tokens")
    byte_chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(special_tokens + ["<pad>"] + byte_chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        chat_template=chat_template,
        extra_special_tokens=named_tokens or {},
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
        # Frames of at most 112x112 pixels: a few dozen video tokens, like the image prompts.
        video_processor=Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}),
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


def _llava_onevision(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(QWEN_SPECIAL + ["<image>", "<video>"], ONEVISION_CHAT_TEMPLATE)
    side, patch = 56, 14
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    config = LlavaOnevisionConfig(
        vision_config=dict(_SIGLIP, image_size=side, patch_size=patch),
        text_config=dict(NEW_TEXT_SIZES, model_type="qwen2", vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    config.pad_token_id = config.text_config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    size = {"height": side, "width": side}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(side // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def _internvl(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    named = dict(
        start_image_token="<img>",
        end_image_token="</img>",
        context_image_token="<IMG_CONTEXT>",
        video_token="<video>",
    )
    tokenizer = build_tokenizer(QWEN_SPECIAL + list(named.values()), INTERNVL_CHAT_TEMPLATE, named)
    side, patch, downsample = 56, 14, 0.5
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=[side, side],
            patch_size=[patch, patch],
        ),
        text_config=dict(NEW_TEXT_SIZES, model_type="qwen2", vocab_size=len(tokenizer)),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=int((side // patch) ** 2 * downsample**2),
        downsample_ratio=downsample,
        tie_word_embeddings=False,
    )
    config.pad_token_id = config.text_config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    size = {"height": side, "width": side}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=4),
        video_processor=InternVLVideoProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return InternVLForConditionalGeneration(config), processor


def _mistral3(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(
        ["<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"], MISTRAL_CHAT_TEMPLATE
    )
    patch, merge = 16, 2
    config = Mistral3Config(
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=128,
            patch_size=patch,
        ),
        text_config=dict(NEW_TEXT_SIZES, model_type="mistral", vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=merge,
        tie_word_embeddings=False,
    )
    config.pad_token_id = config.text_config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(
            size={"longest_edge": 128}, patch_size={"height": patch, "width": patch}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        spatial_merge_size=merge,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    return Mistral3ForConditionalGeneration(config), processor


def _idefics3(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(IDEFICS_SPECIAL, IDEFICS_CHAT_TEMPLATE)
    tile, patch, scale = 32, 8, 2
    config_cls, model_cls, processor_cls, image_processor_cls = {
        "idefics3": (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3Processor,
            Idefics3ImageProcessor,
        ),
        "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor, SmolVLMImageProcessor),
    }[family]
    config = config_cls(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=tile,
            patch_size=patch,
        ),
        text_config=dict(
            NEW_TEXT_SIZES, model_type="llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    image_processor = image_processor_cls(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}
    )
    extra = {"video_processor": SmolVLMVideoProcessor()} if family == "smolvlm" else {}
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=IDEFICS_CHAT_TEMPLATE,
        **extra,
    )
    return model_cls(config), processor


#: Qwen3-VL / Qwen3.5 vision tower: 16-pixel patches merged 2x2, so one token per 32x32 pixels.
QWEN3_PATCH, QWEN3_MERGE = 16, 2
QWEN3_VISION: dict[str, Any] = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=QWEN3_PATCH,
    spatial_merge_size=QWEN3_MERGE,
    temporal_patch_size=2,
    out_hidden_size=64,
    num_position_embeddings=64,
)


def _qwen3_vl_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLProcessor:
    factor = QWEN3_PATCH * QWEN3_MERGE
    return Qwen3VLProcessor(
        # 2 to 12 tokens per image, 4 frames of at most 4x4 tokens per video.
        image_processor=Qwen2VLImageProcessor(
            patch_size=QWEN3_PATCH,
            merge_size=QWEN3_MERGE,
            min_pixels=2 * factor * factor,
            max_pixels=4 * 3 * factor * factor,
        ),
        video_processor=Qwen3VLVideoProcessor(
            patch_size=QWEN3_PATCH,
            merge_size=QWEN3_MERGE,
            size={"shortest_edge": factor * factor, "longest_edge": 4 * factor * factor * 4},
            do_sample_frames=False,
        ),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen3_vl(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(QWEN_SPECIAL, QWEN_CHAT_TEMPLATE)
    text = dict(
        NEW_TEXT_SIZES,
        vocab_size=len(tokenizer),
        head_dim=16,
        # Interleaved M-RoPE over head_dim / 2 = 8 frequencies, T:H:W as in the released 24:20:20.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    )
    if family == "qwen3-vl-moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    # DeepStack: the first vision block's features are also added after decoder layer 0.
    vision = dict(QWEN3_VISION, depth=2, deepstack_visual_indexes=[0])
    config_cls, model_cls = {
        "qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
        "qwen3-vl-moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
    }[family]
    config = config_cls(text_config=text, vision_config=vision, **qwen_vl_token_ids(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    processor = _qwen3_vl_processor(tokenizer)
    return model_cls(config), processor


def _glm4v(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(GLM_SPECIAL, GLM_CHAT_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GLM_SPECIAL}
    patch, merge = 14, 2
    text = dict(
        NEW_TEXT_SIZES,
        vocab_size=len(tokenizer),
        # GLM's post-attention / post-MLP norms swamp the embedding; sharper random attention keeps greedy
        # decoding sensitive to the prompt.
        initializer_range=0.2,
        # Half the head dim rotates (partial_rotary_factor 0.5): 4 of 8 frequencies, split T:H:W.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        },
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        out_hidden_size=64,
        image_size=patch * 8,
    )
    config = Glm4vConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )
    config.pad_token_id = config.text_config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = ids["<|im_end|>"]
    config._attn_implementation = attn_implementation
    factor = patch * merge
    size = {"shortest_edge": 4 * factor * factor, "longest_edge": 12 * factor * factor}
    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size, patch_size=patch, merge_size=merge),
        video_processor=Glm4vVideoProcessor(
            size=size, patch_size=patch, merge_size=merge, do_sample_frames=False
        ),
        tokenizer=tokenizer,
        chat_template=GLM_CHAT_TEMPLATE,
    )
    return Glm4vForConditionalGeneration(config), processor


def _gemma3(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(GEMMA_SPECIAL, GEMMA_CHAT_TEMPLATE, GEMMA_NAMED)
    special_ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<bos>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    )
    text = dict(GEMMA3_TEXT, vocab_size=len(tokenizer), **special_ids)
    if family == "gemma3-text":
        config = Gemma3TextConfig(**text)
        config._attn_implementation = attn_implementation
        return Gemma3ForCausalLM(config), tokenizer
    side, patch, tokens_per_image = 64, 8, 16
    config = Gemma3Config(
        text_config=text,
        vision_config=dict(_SIGLIP, image_size=side, patch_size=patch),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    for key, value in special_ids.items():
        setattr(config, key, value)
    config._attn_implementation = attn_implementation
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": side, "width": side}),
        tokenizer=tokenizer,
        image_seq_length=tokens_per_image,
        chat_template=GEMMA_CHAT_TEMPLATE,
    )
    return Gemma3ForConditionalGeneration(config), processor


def _qwen3_5(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_tokenizer(QWEN_SPECIAL, QWEN_CHAT_TEMPLATE)
    text = dict(
        NEW_TEXT_SIZES,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        # Linear-attention (Gated DeltaNet, no KV) and full-attention layers alternate (the released
        # models: 3 linear then 1 full); random linear layers barely mix tokens, and one full layer
        # alone would leave greedy decoding nearly blind to the prompt.
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention"] * 2,
        # A quarter of head_dim = 32 rotates: 4 frequencies, interleaved T:H:W.
        head_dim=32,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    if family == "qwen3.5-text":
        config = Qwen3_5TextConfig(**text)
        config._attn_implementation = attn_implementation
        return Qwen3_5ForCausalLM(config), tokenizer
    vision = QWEN3_VISION
    config = Qwen3_5Config(text_config=text, vision_config=vision, **qwen_vl_token_ids(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    processor = _qwen3_vl_processor(tokenizer)
    return Qwen3_5ForConditionalGeneration(config), processor


def _mllama(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    # Llama 3.2 Vision: every decoder layer listed in cross_attention_layers attends to the image
    # features instead of the prompt (no self-attention KV there); the prompt holds one <|image|>.
    special = ["<|begin_of_text|>", "<|eot_id|>", "<|image|>", "<|python_tag|>"]
    tokenizer = build_tokenizer(special, LLAMA3_CHAT_TEMPLATE)
    tokenizer.bos_token = "<|begin_of_text|>"
    side, patch = 28, 14
    config = MllamaConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=side,
            patch_size=patch,
            max_num_tiles=2,
            intermediate_layers_indices=[0],
            vision_output_dim=64,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        ),
        text_config=dict(
            NEW_TEXT_SIZES,
            num_hidden_layers=3,
            cross_attention_layers=[1],
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": side, "width": side}, max_image_tiles=2),
        tokenizer=tokenizer,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    return MllamaForConditionalGeneration(config), processor


def _llama4(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    # Llama 4: chunked local attention on most layers and no RoPE on every 4th (NoPE) layer.
    special = [
        "<|begin_of_text|>",
        "<|eot|>",
        "<|image|>",
        "<|image_start|>",
        "<|image_end|>",
        "<|patch|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
    ]
    tokenizer = build_tokenizer(special, LLAMA4_CHAT_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    side, patch, shuffle = 28, 14, 0.5
    config = Llama4Config(
        vision_config=dict(
            # The pixel shuffle (ratio 0.5) turns 32 channels into 128 = intermediate_size.
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=side,
            patch_size=patch,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
            pixel_shuffle_ratio=shuffle,
        ),
        text_config=dict(
            NEW_TEXT_SIZES,
            num_hidden_layers=4,
            head_dim=16,
            intermediate_size_mlp=128,
            num_local_experts=2,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            attention_chunk_size=8,
            no_rope_layer_interval=4,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=ids["<|eot|>"],
        ),
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
    )
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    processor = Llama4Processor(
        image_processor=_LLAMA4_IMAGE_PROCESSOR(size={"height": side, "width": side}, max_patches=2),
        tokenizer=tokenizer,
        patch_size=patch,
        pixel_shuffle_ratio=shuffle,
        chat_template=LLAMA4_CHAT_TEMPLATE,
    )
    return Llama4ForConditionalGeneration(config), processor


def _fuyu(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
    # Fuyu: a Persimmon decoder with one fused query_key_value projection; image patches enter the
    # decoder directly (no vision tower). Returned with its tokenizer only: FuyuProcessor drops the
    # first token of each image-placeholder encoding (SentencePiece's "▁" prefix in the released
    # tokenizer), which loses an image token with a byte-level tokenizer.
    tokenizer = build_tokenizer(["<s>", "|ENDOFTEXT|", "|SPEAKER|", "|NEWLINE|"])
    patch = 14
    config = FuyuConfig(
        text_config=dict(
            model_type="persimmon",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
        ),
        patch_size=patch,
        image_size=56,
        image_token_id=tokenizer.convert_tokens_to_ids("|SPEAKER|"),
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    return FuyuForCausalLM(config), tokenizer


_BUILDERS: dict[str, Callable[[str, str], tuple[PreTrainedModel, Any]]] = {
    "qwen2.5-vl": _qwen_vl,
    "qwen2-vl": _qwen_vl,
    "llava-next": _llava,
    "llava": _llava,
    "llama": _text,
    "qwen2": _text,
    "qwen3": _text,
    "mistral": _text,
    "llava-onevision": _llava_onevision,
    "internvl": _internvl,
    "mistral3": _mistral3,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "qwen3-vl": _qwen3_vl,
    "qwen3-vl-moe": _qwen3_vl,
    "glm4v": _glm4v,
    "gemma3": _gemma3,
    "gemma3-text": _gemma3,
    "qwen3.5": _qwen3_5,
    "qwen3.5-text": _qwen3_5,
    "mllama": _mllama,
    "llama4": _llama4,
    "fuyu": _fuyu,
}


def build_tiny_model(
    family: str, attn_implementation: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """A tiny random-weight model of ``family`` and its processor (tokenizer for text models and fuyu).

    Every decoder has 2-4 layers, 4 query heads sharing 2 KV heads, fp32 weights, eval mode; the
    processors carry a chat template that places the image (and video) tokens.

    Parameters
    ----------
    family : str
        One of :data:`ALL_FAMILIES`.
    attn_implementation : str, default="sdpa"
        ``"sdpa"`` or ``"eager"``.
    seed : int, default=0
        Seed of the random weights (the global RNG state is restored afterwards).
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(_BUILDERS)}")
    builder = _BUILDERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builder(family, attn_implementation)
    return model.to(dtype).eval(), processor


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

    Parameters
    ----------
    processor : ProcessorMixin or PreTrainedTokenizerBase
        What :func:`build_tiny_model` returned; a tokenizer takes the questions as plain text.
    questions : list of str
        One prompt per question.
    images, videos : list, optional
        One PIL image / one video (see :func:`make_video`) per question; at most one of the two.

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
    kind = "image" if images is not None else "video" if videos is not None else None
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": ([{"type": kind}] if kind else []) + [{"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in questions
    ]
    processor.tokenizer.padding_side = "left"
    media_kwargs: dict[str, Any] = {}
    if images is not None:
        # One list per prompt: SmolVLM and Gemma 3 refuse a flat list for a batch, every family takes this.
        media_kwargs["images"] = [[image] for image in images]
    if videos is not None:
        media_kwargs["videos"] = list(videos)
    return dict(processor(text=texts, return_tensors="pt", padding=True, **media_kwargs))
