"""Video prompts (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) compress like image prompts, API and pipeline.

Videos are where KV caches explode; their M-RoPE positions step through frames, so the future decode
position must be ``max(prompt positions) + 1`` (checked against the positions ``generate`` uses).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import pipeline

import mmshiftkv.pipelines  # noqa: F401 - registers the pipeline
from mmshiftkv.models import get_adapter
from mmshiftkv.presses import FullKVPress, ShiftKVPress, SnapKVPress
from mmshiftkv.testing import make_video, tiny

VIDEO_FAMILIES = ("qwen2.5-vl", "qwen3-vl", "llava-onevision")
QUESTION = "What moves in the video?"


def video_inputs(processor, seeds: list[int]) -> dict:
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    processor.tokenizer.padding_side = "left"
    videos = [make_video(seed, frames=4) for seed in seeds]  # LLaVA-OneVision batches equal lengths only
    return dict(processor(videos=videos, text=[text] * len(seeds), return_tensors="pt", padding=True))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_prompt_compresses_every_kv_layer_and_positions_follow_generate(family: str):
    model, processor = tiny(family)
    adapter = get_adapter(model)
    inputs = video_inputs(processor, [0, 1])
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with FullKVPress()(model), torch.no_grad():
        assert torch.equal(plain, model.generate(**inputs, max_new_tokens=3, do_sample=False))

    seen: list[torch.Tensor] = []
    hook = adapter.rotary_emb.register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[1] if len(a) > 1 else kw["position_ids"]), with_kwargs=True
    )
    press = ShiftKVPress(budget=8, n_proxies=64, n_groups=8)
    try:
        with press(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert min(press.stats.prompt_tokens) > 8
    assert press.stats.kept.eq(8).all() and press.stats.compressed
    batch = inputs["input_ids"].shape[0]
    prompt = adapter.normalize_positions(seen[0], batch)
    decode = torch.cat([adapter.normalize_positions(p, batch) for p in seen[1:]], dim=-1)
    assert torch.equal(decode, adapter.future_positions(prompt, torch.arange(decode.shape[-1])))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_pipeline_answers_videos_like_generate(family: str):
    model, processor = tiny(family)
    pipe = pipeline("kv-press-vqa", model=model, processor=processor)
    video = make_video(3, frames=4)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    inputs = processor(videos=[video], text=[text], return_tensors="pt")
    press = SnapKVPress(budget=8, window_size=4)
    with press(model), torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.batch_decode(expected[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    press = SnapKVPress(budget=8, window_size=4)
    result = pipe(videos=video, question=QUESTION, press=press, max_new_tokens=3)
    assert result["answer"] == answer.strip()
    assert result["image_tokens"] > 0
    assert all(head == 8 for layer in result["kept_per_head"] for head in layer)
    assert result["cache_bytes_after"] < result["cache_bytes_before"]
