"""Tiny models of the families a press refuses: Mllama, Llama 4, Fuyu (see the builders' comments)."""

from __future__ import annotations

from typing import Any

import transformers
from transformers import (
    FuyuConfig,
    FuyuForCausalLM,
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4Processor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    PreTrainedModel,
)

from mmshiftkv.testing.chat_templates import LLAMA3_CHAT_TEMPLATE, LLAMA4_CHAT_TEMPLATE
from mmshiftkv.testing.families import NEW_TEXT_SIZES
from mmshiftkv.tokenization import build_tokenizer

_LLAMA4_IMAGE_PROCESSOR = (
    getattr(transformers, "Llama4ImageProcessor", None) or transformers.Llama4ImageProcessorFast
)


def mllama(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def llama4(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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


def fuyu(family: str, attn_implementation: str) -> tuple[PreTrainedModel, Any]:
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
