"""The kv-press-vqa pipeline and the evaluation runner on every vision-language family, batches of 1 and 2.

Oracles: the same requests answered one by one, and plain ``generate`` under a fresh press. Text-only
families have no place in either (both answer questions about images; the pipeline refuses a model
without a vision tower, ``tests/test_pipeline.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_evaluation_runner import write_task_datasets
from transformers import pipeline

import mmshiftkv.pipelines  # noqa: F401 - registers the pipeline
from mmshiftkv.cache.compat import prompt_cache_argument
from mmshiftkv.evaluation import runner
from mmshiftkv.evaluation.config import EvalConfig
from mmshiftkv.generation import encode_messages, generate_answers, user_turn
from mmshiftkv.presses import FullKVPress, SnapKVPress, UnsupportedCacheError
from mmshiftkv.testing import ALL_VISION_FAMILIES, synthetic_image, tiny

QUESTION = "What is written in the picture?"


def press() -> SnapKVPress:
    return SnapKVPress(budget=8, window_size=4)


def own_cache_class(model) -> bool:
    """Qwen3.5 on transformers 5.2 keeps its KV in its own class, which a press refuses (README)."""
    return not prompt_cache_argument(model)


@pytest.mark.parametrize("family", ALL_VISION_FAMILIES)
def test_pipeline_batches_of_one_and_several_questions_equal_one_by_one(family: str):
    model, processor = tiny(family)
    pipe = pipeline("kv-press-vqa", model=model, processor=processor)  # Gemma 3 was refused here
    one = {"images": synthetic_image(0), "question": QUESTION}
    several = {"images": synthetic_image(1), "questions": ["Colour?", "How many boxes are there?"]}
    if own_cache_class(model):
        with pytest.raises(UnsupportedCacheError, match="Qwen3_5DynamicCache"):
            pipe(one, press=press(), max_new_tokens=3)
        with pytest.raises(UnsupportedCacheError, match="several questions"):
            pipe(several, press=FullKVPress(), max_new_tokens=3)
        plain = pipe(one, press=FullKVPress(), max_new_tokens=3)[0]  # the uncompressed path still runs
        inputs = encode_messages(processor, [user_turn(QUESTION, image=synthetic_image(0))])
        assert plain["answer"] == generate_answers(model, processor, inputs, None, 3)[0]["generated"].strip()
        return
    batched = pipe([one, several], press=press(), max_new_tokens=3, batch_size=2)
    # The one-question request is compressed with its question, as generate under the press does it
    # alone; the several-question one decodes each question from a copy of its compressed prompt.
    inputs = encode_messages(processor, [user_turn(QUESTION, image=synthetic_image(0))])
    expected = generate_answers(model, processor, inputs, press(), 3)[0]
    assert batched[0]["answer"] == expected["generated"].strip()
    assert batched[0]["prompt_tokens"] == expected["prompt_tokens"] > batched[1]["prompt_tokens"]
    alone = pipe(several, press=press(), max_new_tokens=3, batch_size=1)[0]
    assert batched[1]["answers"] == alone["answers"] and len(alone["answers"]) == 2
    assert batched[1]["kept_per_head"] == alone["kept_per_head"]
    assert torch.tensor(batched[0]["kept_per_head"]).max() <= 8
    assert batched[0]["image_tokens"] > 0
    if family == "gemma3":  # counted by the soft token the config names: mm_tokens_per_image per image
        assert batched[0]["image_tokens"] == model.config.mm_tokens_per_image


def predictions(output_dir: Path) -> dict[int, str]:
    (path,) = (output_dir / "predictions").glob("*/*snapkv*.jsonl")
    return {r["index"]: r["prediction"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize("family", ALL_VISION_FAMILIES)
def test_eval_runner_batches_of_two_equal_batches_of_one(family: str, tmp_path: Path):
    model, processor = tiny(family)
    folders = write_task_datasets(tmp_path / "data", 2, tasks=["chartqa"])

    def evaluate(batch_size: int) -> dict[int, str]:
        out = tmp_path / f"batch{batch_size}"
        config = EvalConfig(
            model="tiny",
            tasks=("chartqa",),
            presses=("snapkv",),
            budgets=(8,),
            batch_size=batch_size,
            max_new_tokens=3,
            dataset_ids={"chartqa": folders["chartqa"]},
            output_dir=str(out),
            cache_dir=str(tmp_path / "cache"),
            plot=False,
        )
        assert runner.run_evaluation(config, model, processor).complete
        return predictions(out)

    if own_cache_class(model):
        with pytest.raises(UnsupportedCacheError, match="Qwen3_5DynamicCache"):
            evaluate(2)
        return
    assert evaluate(2) == evaluate(1)
