"""The "kv-press-vqa" pipeline on tiny models of each vision family."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, pipeline

import mmshiftkv.pipelines  # noqa: F401 - registers the pipeline
from mmshiftkv.cache import cache_argument
from mmshiftkv.presses import KeyDiffPress, SnapKVPress
from mmshiftkv.testing import VISION_FAMILIES, synthetic_image, tiny

QUESTION = "What is written in the picture?"


def vqa(family: str):
    model, processor = tiny(family)
    return pipeline("kv-press-vqa", model=model, processor=processor), model, processor


def reference_generate(model, processor, images, question, press=None, max_new_tokens=6) -> str:
    """Plain model.generate on the processor's chat prompt, optionally under a press."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=[text], return_tensors="pt")
    kwargs = dict(
        **inputs, **cache_argument(model, DynamicCache()), max_new_tokens=max_new_tokens, do_sample=False
    )
    if press is None:
        output = model.generate(**kwargs)
    else:
        with press(model):
            output = model.generate(**kwargs)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[
        0
    ].strip()


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_single_question_equals_generate_with_and_without_press(family: str):
    pipe, model, processor = vqa(family)
    image = synthetic_image(0)
    plain = pipe(images=image, question=QUESTION, max_new_tokens=6)
    assert plain["answer"] == reference_generate(model, processor, [image], QUESTION)
    press = SnapKVPress(budget=8, window_size=4)
    result = pipe(images=image, question=QUESTION, press=press, max_new_tokens=6)
    assert result["answer"] == reference_generate(
        model, processor, [image], QUESTION, SnapKVPress(budget=8, window_size=4)
    )
    assert result["prompt_tokens"] > 8 and result["image_tokens"] > 0
    assert torch.tensor(result["kept_per_head"]).eq(8).all()
    assert result["cache_bytes_after"] < result["cache_bytes_before"]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava"])
def test_multi_image_prompt(family: str, tmp_path):
    pipe, model, processor = vqa(family)
    path = tmp_path / "second.png"
    synthetic_image(1).save(path)
    result = pipe(images=[synthetic_image(0), str(path)], question=QUESTION, max_new_tokens=4)
    expected = reference_generate(
        model, processor, [synthetic_image(0), synthetic_image(1)], QUESTION, max_new_tokens=4
    )
    assert result["answer"] == expected


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava-next"])
def test_several_questions_reuse_one_compressed_prefill(family: str):
    pipe, model, processor = vqa(family)
    questions = ["What is written?", "Which colour is the first box?", "How many boxes are there?"]
    prefills = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: prefills.append(kw.get("pixel_values") is not None), with_kwargs=True
    )
    try:
        result = pipe(
            images=synthetic_image(2), questions=questions, press=KeyDiffPress(budget=8), max_new_tokens=4
        )
    finally:
        hook.remove()
    assert len(result["answers"]) == 3
    assert sum(prefills) == 1  # the image was encoded and compressed once
    # Each answer equals asking that question alone after the same compressed context.
    for question, answer in zip(questions, result["answers"]):
        alone = pipe(
            images=synthetic_image(2),
            questions=[question, question],
            press=KeyDiffPress(budget=8),
            max_new_tokens=4,
        )
        assert alone["answers"] == [answer, answer]


def test_batched_requests_equal_one_by_one():
    pipe, _, _ = vqa("qwen2.5-vl")
    requests = [
        {"images": synthetic_image(i), "question": q}
        for i, q in enumerate([QUESTION, "Colour?", "Which box is the largest one here, please?"])
    ]
    press = SnapKVPress(budget=10, window_size=4)
    batched = pipe(requests, press=press, max_new_tokens=4, batch_size=3)
    single = [pipe(request, press=press, max_new_tokens=4, batch_size=1)[0] for request in requests]
    assert [r["answer"] for r in batched] == [r["answer"] for r in single]
    assert len(batched) == 3


def test_bad_inputs_raise_clear_errors(tmp_path):
    pipe, model, _ = vqa("qwen2.5-vl")
    with pytest.raises(ValueError, match="no image or video given"):
        pipe(images=None, question=QUESTION)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot open image"):
        pipe(images=str(broken), question=QUESTION)
    with pytest.raises(ValueError, match="non-empty"):
        pipe(images=synthetic_image(0), question="   ")
    with pytest.raises(ValueError, match="no question"):
        pipe(images=synthetic_image(0))
    _, llava_processor = tiny("llava")
    with pytest.raises(ValueError, match="does not match the model"):
        pipeline("kv-press-vqa", model=model, processor=llava_processor)
    text_model, _ = tiny("llama")
    with pytest.raises(TypeError, match="image-text model"):
        pipeline("kv-press-vqa", model=text_model, processor=pipe.processor)


def test_questions_appended_to_a_compressed_image_prompt_are_answered_right_by_the_trained_model():
    """On a trained model, wrong positions after the image would give wrong answers, not just other ones."""
    from mmshiftkv.demo import grounding_questions
    from mmshiftkv.grounding import ANSWER_PREFIX, load_grounding_model
    from mmshiftkv.presses import FullKVPress

    model, processor = load_grounding_model()
    pipe = pipeline("kv-press-vqa", model=model, processor=processor)
    questions = grounding_questions(0)
    expected = [ANSWER_PREFIX + question.expected for question in questions]
    texts = [question.text for question in questions]
    image = questions[0].image
    asked_together = pipe(images=image, questions=texts, press=FullKVPress(), max_new_tokens=16)
    assert asked_together["answers"] == expected
    compressed = pipe(images=image, questions=texts, press=KeyDiffPress(budget=16), max_new_tokens=16)
    assert compressed["cache_bytes_after"] < compressed["cache_bytes_before"]
    assert sum(answer == want for answer, want in zip(compressed["answers"], expected)) >= 3
