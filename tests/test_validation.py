"""Bad configurations fail when they are built, with an error naming the field and the value.

Presses, allocators, head-score files and the pipeline's arguments: NaN/inf floats, floats or
bools where a count is asked for, a string where a list of questions is asked for.
"""

from __future__ import annotations

import math

import pytest
from transformers import pipeline

import mmshiftkv.pipelines  # noqa: F401 - registers the pipeline
from mmshiftkv.allocators import AdaAllocator, PyramidAllocator, SparseMMAllocator, load_head_scores
from mmshiftkv.presses import (
    ExpectedAttentionPress,
    KeyDiffPress,
    LastAttnPress,
    ShiftKVPress,
    SnapKVPress,
    StreamingLLMPress,
)
from mmshiftkv.testing import synthetic_image, tiny

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ShiftKVPress(gamma=NAN), "gamma must be finite"),
        (lambda: ShiftKVPress(gamma=INF), "gamma must be finite"),
        (lambda: ShiftKVPress(tau=NAN), "tau must be finite"),
        (lambda: ShiftKVPress(anchor_weight=NAN), "anchor_weight must be finite"),
        (lambda: ShiftKVPress(anchor_weight=-INF), "anchor_weight must be finite"),
        (lambda: ShiftKVPress(anchor_weight=-1.0), "anchor_weight must be >= 0"),
        (lambda: ExpectedAttentionPress(epsilon=NAN), "epsilon must be finite"),
        (lambda: ExpectedAttentionPress(epsilon=-0.1), "epsilon must be >= 0"),
        (lambda: AdaAllocator(alpha=INF), "alpha"),
        (lambda: PyramidAllocator(beta=INF), "beta"),
        (lambda: PyramidAllocator(beta=NAN), "beta"),
        (lambda: SparseMMAllocator({"0-0": [1.0]}, ratio=NAN), "ratio"),
    ],
)
def test_non_finite_floats_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SnapKVPress(window_size=1.5), r"window_size must be an int, got 1.5 \(float\)"),
        (lambda: SnapKVPress(window_size=True), "window_size must be an int, got True"),
        (lambda: SnapKVPress(kernel_size=5.0), "kernel_size must be an int"),
        (lambda: StreamingLLMPress(n_sink=1.5), "n_sink must be an int"),
        (lambda: ExpectedAttentionPress(n_future_positions=512.0), "n_future_positions must be an int"),
        (lambda: ExpectedAttentionPress(n_sink=False), "n_sink must be an int"),
        (lambda: ShiftKVPress(n_proxies=512.0), "n_proxies must be an int"),
        (lambda: ShiftKVPress(n_groups=True), "n_groups must be an int"),
        (lambda: ShiftKVPress(stats_window=2.5), "stats_window must be an int"),
        (lambda: ShiftKVPress(position_stride=32.0), "position_stride must be an int"),
        (lambda: ShiftKVPress(seed=0.5), "seed must be an int"),
        (lambda: ShiftKVPress(gamma="10"), "gamma must be a number"),
        (lambda: ShiftKVPress(tau=True), "tau must be a number"),
        (lambda: ShiftKVPress(sampling="no"), "sampling must be True or False"),
        (lambda: ShiftKVPress(voting=1), "voting must be True or False"),
        (lambda: ExpectedAttentionPress(use_vnorm=0), "use_vnorm must be True or False"),
    ],
)
def test_wrong_types_are_rejected(make, match):
    with pytest.raises(TypeError, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SnapKVPress(window_size=0), "window_size must be >= 1"),
        (lambda: SnapKVPress(kernel_size=4), "odd"),
        (lambda: StreamingLLMPress(n_sink=-1), "n_sink must be >= 0"),
        (lambda: ShiftKVPress(position_start=-1), "position_start must be >= 0"),
        (lambda: ShiftKVPress(stats_window=1), "stats_window must be >= 2"),
        (lambda: ShiftKVPress(n_groups=0), "n_groups must be >= 1"),
    ],
)
def test_out_of_range_counts_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_valid_numbers_of_either_type_are_accepted():
    press = ShiftKVPress(gamma=1, tau=1, anchor_weight=0, n_proxies=64, n_groups=4, stats_window=2)
    assert (press.gamma, press.tau, press.n_proxies, press.budget) == (1, 1, 64, 64)
    assert StreamingLLMPress(n_sink=0, budget=8).n_sink == 0
    assert ExpectedAttentionPress(epsilon=0, use_vnorm=False).epsilon == 0


@pytest.mark.parametrize(
    "press_cls",
    [ShiftKVPress, SnapKVPress, StreamingLLMPress, KeyDiffPress, ExpectedAttentionPress, LastAttnPress],
)
def test_an_allocator_needs_an_explicit_budget_for_every_press(press_cls):
    with pytest.raises(ValueError, match="PyramidAllocator allocates a budget: pass budget="):
        press_cls(allocator=PyramidAllocator())
    assert press_cls(budget=64, allocator=PyramidAllocator()).budget == 64


def test_shiftkv_default_budget_applies_only_without_ratio_and_allocator():
    assert ShiftKVPress().budget == 64
    assert ShiftKVPress(compression_ratio=0.5).budget is None


@pytest.mark.parametrize(
    "press_cls",
    [ShiftKVPress, SnapKVPress, StreamingLLMPress, KeyDiffPress, ExpectedAttentionPress, LastAttnPress],
)
def test_a_model_passed_positionally_is_refused(press_cls):
    model, _ = tiny("qwen2.5-vl")
    # The press is called on the model (`press(model)`), never built from it.
    with pytest.raises(TypeError, match="positional argument"):
        press_cls(model)
    with pytest.raises(TypeError, match="positional argument"):
        press_cls(0.5)


# ---------------------------------------------------------------------------------------------
# Head-score files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "not json", '{"0-0": [1.0]', "\ufeff{}x"])
def test_a_head_score_file_that_is_not_json_names_the_file(tmp_path, content):
    path = tmp_path / "scores.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"head-score file '.*scores\.json' is not JSON"):
        load_head_scores(path)
    with pytest.raises(ValueError, match=r"scores\.json' is not JSON"):
        SparseMMAllocator(head_scores=path)


def test_a_head_score_file_in_another_encoding_names_the_file(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes('{"0-0": [1.0], "é": 1}'.encode("utf-16"))
    with pytest.raises(ValueError, match=r"latin\.json' is not JSON"):
        load_head_scores(path)


# ---------------------------------------------------------------------------------------------
# Pipeline arguments
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    model, processor = tiny("qwen2.5-vl")
    return pipeline("kv-press-vqa", model=model, processor=processor)


def test_pipeline_refuses_a_string_as_the_list_of_questions(pipe):
    image = synthetic_image(0)
    with pytest.raises(TypeError, match="questions must be a list of strings, got the string 'abc'"):
        pipe(images=image, questions="abc")
    with pytest.raises(TypeError, match="questions must be a list of strings"):
        pipe([{"images": image, "questions": "abc"}])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"batch_size": -2}, ValueError, "batch_size must be >= 1"),
        ({"batch_size": 2.5}, TypeError, r"batch_size must be an int, got 2.5"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 4.0}, TypeError, "max_new_tokens must be an int"),
    ],
)
def test_pipeline_refuses_bad_batch_sizes_and_lengths(pipe, kwargs, error, match):
    requests = [{"images": synthetic_image(0), "question": "What?"}]
    with pytest.raises(error, match=match):
        pipe(requests, **kwargs)
    with pytest.raises(error, match=match):
        pipe(images=synthetic_image(0), question="What?", **kwargs)
