"""Qwen2-VL and Qwen2.5-VL with images: vLLM + press equals transformers + the same press."""

from __future__ import annotations

import math
import warnings

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmshiftkv.registry import make_press  # noqa: E402
from vllm_plugin.vllm_helpers import BLOCK_SIZE, BUDGET, engine, history_of, selections_of  # noqa: E402

MAX_TOKENS = 20
#: One image (112 x 112 pixels: 16 image tokens) per request, text of different lengths around it.
TEXT_REPEATS = (2, 9, 20)


def requests(processor) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(0)
    out = []
    for repeats in TEXT_REPEATS:
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "describe it " * repeats}],
            }
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append((text, Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))))
    return out


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
    ],
)
def test_press_with_images_matches_transformers(vl_models, family, press_name):
    from vllm import SamplingParams

    folder, model, processor = vl_models(family)
    batch = requests(processor)
    with engine(folder, press_name, limit_mm_per_prompt={"image": 1, "video": 0}) as llm:
        outputs = llm.generate(
            [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in batch],
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        )
        selections = selections_of(llm)
        history = history_of(llm)

    for output, (text, image) in zip(outputs, batch):
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        prompt_len = inputs["input_ids"].shape[1]
        assert len(output.prompt_token_ids) == prompt_len > BUDGET
        press = make_press(press_name, budget=BUDGET)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with press(model):
                expected = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        assert list(output.outputs[0].token_ids) == expected[0, prompt_len:].tolist(), output.request_id
        for layer, kept in selections[output.request_id].items():
            assert torch.equal(kept, press.stats.indices[layer][0, :, :BUDGET]), (output.request_id, layer)
        for record in history[output.request_id]:
            assert record.blocks == math.ceil((BUDGET + record.tokens - prompt_len) / BLOCK_SIZE)
