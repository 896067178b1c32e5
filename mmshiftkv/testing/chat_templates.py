"""Special tokens and chat templates of the tiny models' families (Qwen's: :mod:`mmshiftkv.tokenization`).

Each template renders the family's image (and video) placeholders where a message part of that type
stands, as the released checkpoints' templates do, so the processors expand them into image tokens.
"""

from __future__ import annotations

from mmshiftkv.tokenization import chatml_template

LLAVA_SPECIAL = ["<s>", "</s>", "<image>"]

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
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
