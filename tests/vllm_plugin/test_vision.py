"""Vision-language models with images: vLLM + press equals transformers + the same press.

Split M-RoPE (Qwen2-VL, Qwen2.5-VL), interleaved M-RoPE with DeepStack (Qwen3-VL) and plain RoPE
behind a SigLIP tower (LLaVA-OneVision).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vllm_plugin.vllm_helpers import (  # noqa: E402
    BLOCK_SIZE,
    BUDGET,
    assert_kept_as_transformers,
    engine,
    history_of,
    scheduler_of,
    selections_of,
    transformers_generate,
)

MAX_TOKENS = 20
#: One image (112 x 112 pixels) per request, text of different lengths around it.
TEXT_REPEATS = (2, 9, 20)


def image_prompt(processor, repeats: int) -> str:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe it " * repeats}]}
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def requests(processor, seed: int = 0) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in TEXT_REPEATS]
    return [(image_prompt(processor, repeats), image) for repeats, image in zip(TEXT_REPEATS, images)]


def vllm_generate(llm, batch: list[tuple[str, Image.Image]]):
    from vllm import SamplingParams

    return llm.generate(
        [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in batch],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
    )


@pytest.fixture(scope="module")
def vl_models(model_dirs):
    """Per family: the saved folder, the transformers model and its processor (loaded once)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = {}

    def load(family: str):
        if family not in loaded:
            folder = model_dirs(family)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            loaded[family] = folder, model, AutoProcessor.from_pretrained(folder)
        return loaded[family]

    return load


@pytest.mark.parametrize(
    ("family", "press_name"),
    [
        ("qwen2.5-vl", "shiftkv"),
        ("qwen2.5-vl", "snapkv"),
        ("qwen2.5-vl", "expected_attention"),  # M-RoPE cos/sin tables read from vLLM's rotary cache
        ("qwen2-vl", "shiftkv"),
        ("qwen3-vl", "shiftkv"),  # q-norm, DeepStack features added after the first decoder layer
        ("qwen3-vl", "expected_attention"),  # interleaved M-RoPE cos/sin
        ("llava-onevision", "shiftkv"),
    ],
)
def test_press_with_images_matches_transformers(vl_models, family, press_name):
    folder, model, processor = vl_models(family)
    batch = requests(processor)
    with engine(folder, press_name, limit_mm_per_prompt={"image": 1, "video": 0}) as llm:
        outputs = vllm_generate(llm, batch)
        selections = selections_of(llm)
        history = history_of(llm)

    for output, (text, image) in zip(outputs, batch):
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        prompt_len = inputs["input_ids"].shape[1]
        assert len(output.prompt_token_ids) == prompt_len > BUDGET
        tokens, stats = transformers_generate(model, inputs, press_name, MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == tokens, output.request_id
        assert_kept_as_transformers(selections[output.request_id], stats, output.request_id)
        for record in history[output.request_id]:
            assert record.blocks == math.ceil((BUDGET + record.tokens - prompt_len) / BLOCK_SIZE)


def test_prompt_split_at_its_image_without_chunked_prefill_is_compacted_after_its_last_piece(vl_models):
    """vLLM splits a prompt even with chunked prefill off when a step's encoder budget is spent: the
    request is scored and compacted once all of it is in, as under chunked prefill.

    Here the scheduler's encoder budget is cut below two images after the engine started, so the
    second request of the first step is scheduled up to its image only.
    """
    folder, model, processor = vl_models("qwen2.5-vl")
    batch = requests(processor)[:2]
    with engine(folder, "snapkv", limit_mm_per_prompt={"image": 1, "video": 0}) as llm:
        scheduler = scheduler_of(llm)
        scheduler.max_num_encoder_input_tokens = 20  # one 16-token image per step
        outputs = vllm_generate(llm, batch)
        selections = selections_of(llm)
        history = history_of(llm)
        in_use = scheduler.mmshiftkv_ledger.blocks_in_use()

    split = [req_id for req_id, records in history.items() if records[0].tokens < records[0].prompt_len]
    assert split == [outputs[1].request_id]  # the second prompt came in two pieces
    for output, (text, image) in zip(outputs, batch):
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        tokens, stats = transformers_generate(model, inputs, "snapkv", MAX_TOKENS)
        assert output.outputs[0].finish_reason == "length"
        assert list(output.outputs[0].token_ids) == tokens, output.request_id
        assert_kept_as_transformers(selections[output.request_id], stats, output.request_id)
    assert in_use == 0
