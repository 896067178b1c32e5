"""The tiny model families by what they are, and the decoder sizes they share.

:data:`ALL_FAMILIES` are the families the library compresses (every structural test runs over them);
:data:`REFUSED_FAMILIES` are built too, so that the library's refusal of them can be tested.
"""

from __future__ import annotations

from typing import Any

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
#: Every family a press compresses: the structural contract tests run over all of them.
ALL_FAMILIES = FAMILIES + NEW_VISION_FAMILIES + NEW_TEXT_FAMILIES
#: Every vision-language family a press compresses (their prompts carry an image).
ALL_VISION_FAMILIES = VISION_FAMILIES + NEW_VISION_FAMILIES
