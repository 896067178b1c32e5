"""Tiny models of the newer vision-language families, each from its own transformers classes.

LLaVA-OneVision, InternVL, Mistral 3, Idefics3 / SmolVLM, Qwen3-VL(-MoE), GLM-4V, Gemma 3 and Qwen3.5
(and the text decoders of the last two alone). Builders as in :mod:`mmshiftkv.testing.classic_models`.
"""

from __future__ import annotations

from typing import Any

from transformers import (
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
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
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

from mmshiftkv.testing.chat_templates import (
    GEMMA_CHAT_TEMPLATE,
    GEMMA_NAMED,
    GEMMA_SPECIAL,
    GLM_CHAT_TEMPLATE,
    GLM_SPECIAL,
    IDEFICS_CHAT_TEMPLATE,
    IDEFICS_SPECIAL,
    INTERNVL_CHAT_TEMPLATE,
    MISTRAL_CHAT_TEMPLATE,
    ONEVISION_CHAT_TEMPLATE,
)
from mmshiftkv.testing.families import NEW_TEXT_SIZES
from mmshiftkv.tokenization import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL, build_tokenizer, qwen_vl_token_ids

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


#: A tiny SigLIP vision tower (no pooling head), shared by the families whose encoder is SigLIP.
_SIGLIP: dict[str, Any] = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vision_use_head=False,
)


def llava_onevision(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def internvl(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def mistral3(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def idefics3(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def qwen3_vl(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def glm4v(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def gemma3(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def qwen3_5(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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
