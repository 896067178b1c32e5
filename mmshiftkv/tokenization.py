"""Byte-level tokenizers built in code, and the ChatML chat template of Qwen-VL models.

The shipped grounding model (:mod:`mmshiftkv.grounding`) is saved with a tokenizer made by
:func:`build_tokenizer` and loads offline; :mod:`mmshiftkv.testing` builds the tiny models' tokenizers
with the same function. Nothing here downloads a vocabulary: every string encodes byte by byte.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

QWEN_SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


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
