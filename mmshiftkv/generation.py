"""Load a model, encode chat messages into a left-padded batch, generate greedily under a press.

What the evaluation runner, the Fig. 1 analysis, the demo, the grounding evaluation and the SparseMM
calibration share:

>>> model, processor = load_model("Qwen/Qwen2.5-VL-7B-Instruct", "bfloat16", device="cuda")
>>> conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
...                                                {"type": "text", "text": "What is written here?"}]}]]
>>> inputs = encode_messages(processor, conversations, model.device)
>>> generate_answers(model, processor, inputs, ShiftKVPress(budget=64), max_new_tokens=32)
[{'generated': '...', 'prompt_tokens': 1234, 'kept_tokens': 64.0}]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel
from transformers.utils import logging as transformers_logging

from mmshiftkv.cache.compat import prompt_cache_argument
from mmshiftkv.presses import BudgetedPress

__all__ = [
    "DTYPES",
    "EvalSetupError",
    "encode_messages",
    "first_line",
    "generate_answers",
    "load_model",
    "quiet_weight_loading",
    "user_turn",
]

#: ``--dtype`` choices; "auto" keeps the checkpoint's dtype.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


class EvalSetupError(ValueError):
    """A run cannot start (the model, a dataset or the output directory is unusable); the message
    says why and what to do. Raised before anything is generated."""


def first_line(error: BaseException) -> str:
    """``"Type: first line of the message"``, without a final full stop (the caller adds a sentence)."""
    text = str(error).strip()
    line = text.splitlines()[0].rstrip(" .:") if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" progress bar, restoring the setting after.

    The bar redraws once per weight and floods the logs of batch jobs; the evaluation's own
    progress bars are not affected.
    """
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def load_model(
    model_id: str,
    dtype: str = "auto",
    device_map: str | None = None,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` from a hub id or a local directory.

    With ``device_map`` (e.g. ``"auto"``) accelerate places the weights; otherwise the model is
    moved to ``device``. The processor pads on the left, as batched generation needs. The
    "Loading weights" progress bar is hidden (:func:`quiet_weight_loading`).

    Raises
    ------
    EvalSetupError
        If the model or its processor cannot be loaded (one line naming the cause and the
        local-directory way out).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_weight_loading():
            model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise EvalSetupError(
            f"cannot load the model {model_id!r}: {first_line(error)}. Without the hub, pass --model a "
            "local directory holding the checkpoint and its processor (save_pretrained)"
        ) from error
    if device_map is None and device is not None:
        model = model.to(device)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def user_turn(question: str, image: Any = None, video: Any = None) -> list[dict]:
    """A conversation of one user turn: the image or the video (when given), then ``question``."""
    media = [{"type": "image", "image": image}] if image is not None else []
    media += [{"type": "video", "video": video}] if video is not None else []
    return [{"role": "user", "content": [*media, {"type": "text", "text": question}]}]


def _parts(conversation: list[dict], kind: str) -> list[Any]:
    """The ``kind`` payloads (``"image"``, ``"video"``) of a conversation's message parts, in order."""
    return [
        part[kind]
        for message in conversation
        if not isinstance(message["content"], str)
        for part in message["content"]
        if part["type"] == kind
    ]


def encode_messages(
    processor: Any,
    conversations: Sequence[list[dict]],
    device: torch.device | str | None = None,
    *,
    images_per_prompt: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Chat-template and tokenize one conversation per sample into a left-padded batch.

    The images and videos are taken from the conversations' ``{"type": "image", "image": PIL}`` and
    ``{"type": "video", "video": frames}`` parts, in order, so multi-image prompts (MMMU) keep each
    image at its place in the text.

    Parameters
    ----------
    processor : ProcessorMixin
        The model's processor, with a chat template.
    conversations : sequence of list of dict
        One chat (list of ``{"role", "content"}`` messages) per sample.
    device : torch.device or str, optional
        Where the returned tensors go (default: where the processor made them).
    images_per_prompt : bool, optional
        True: give the processor one list of images per prompt; False: one flat list. By default,
        one list per prompt (SmolVLM and Gemma 3 refuse a flat list for a batch, the other
        processors of the supported families take both), and one flat list where the processor
        refuses the nested form (``ValueError`` or ``TypeError``); if it refuses both, the first
        refusal is raised.

    Returns
    -------
    dict of str to torch.Tensor
        The processor's outputs: ``input_ids`` and ``attention_mask`` of shape ``(batch, seq_len)``,
        plus the model's pixel tensors.
    """
    texts = [
        processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        for conversation in conversations
    ]
    images = [_parts(conversation, "image") for conversation in conversations]
    videos = [video for conversation in conversations for video in _parts(conversation, "video")]
    flat = [image for per in images for image in per]
    processor.tokenizer.padding_side = "left"

    def encode(chosen: list) -> Any:
        media = {"images": chosen} if flat else {}
        media.update({"videos": videos} if videos else {})
        return processor(text=texts, return_tensors="pt", padding=True, **media)

    if not flat or images_per_prompt is not None:
        inputs = encode(images if images_per_prompt is not False else flat)
    else:
        try:
            inputs = encode(images)
        except (ValueError, TypeError) as nested_refused:
            try:
                inputs = encode(flat)
            except (ValueError, TypeError):
                raise nested_refused from None
    return {k: v if device is None else v.to(device) for k, v in inputs.items()}


def generate_answers(
    model: PreTrainedModel,
    processor: Any,
    inputs: dict,
    press: BudgetedPress | None,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """Greedy generation under ``press`` (None: the full cache); per sample the text and the compression.

    Returns
    -------
    list of dict
        Per sample: ``generated`` (the decoded new tokens), ``prompt_tokens`` (real prompt tokens)
        and ``kept_tokens`` (prompt tokens kept per KV head, mean over layers and heads).
    """
    with press(model) if press is not None else contextlib.nullcontext(), torch.no_grad():
        output = model.generate(
            **inputs,
            **prompt_cache_argument(model),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # A press that keeps everything records nothing where the model built a cache of its own class
    # (Qwen3.5 on transformers 5.2): the full cache's figures are the mask's.
    if press is None or (not press.asks_compression and not press.stats.prompt_tokens):
        lengths = inputs["attention_mask"].sum(-1).tolist()
        return [
            {"generated": t, "prompt_tokens": int(n), "kept_tokens": float(n)} for t, n in zip(texts, lengths)
        ]
    stats = press.stats
    return [
        {
            "generated": text,
            "prompt_tokens": int(stats.prompt_tokens[b]),
            "kept_tokens": float(stats.kept[:, b, :].float().mean()),
        }
        for b, text in enumerate(texts)
    ]
