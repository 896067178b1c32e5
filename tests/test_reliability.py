"""Misuse that used to give silently wrong output or crash deep inside is refused with a clear error.

Each test reproduces one case of the reliability issue; the message must name the problem.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.cache import CompressedLayer, cache_argument, compressed_attention
from mmshiftkv.presses import (
    FullKVPress,
    PressUsageError,
    ShiftKVPress,
    SnapKVPress,
    StreamingLLMPress,
)
from mmshiftkv.testing import QUESTION, build_tiny_model, make_inputs, tiny

BUDGET = 8


def prefill(model, inputs: dict, press) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, cache))
    return cache


def test_right_padding_is_refused():
    model, tokenizer = tiny("qwen2")
    tokenizer.padding_side = "right"
    inputs = dict(tokenizer([QUESTION, "Short?"], return_tensors="pt", padding=True))
    tokenizer.padding_side = "left"
    with pytest.raises(PressUsageError, match="right padding.*padding_side = 'left'"):
        prefill(model, inputs, SnapKVPress(budget=BUDGET))


def test_a_sample_without_real_tokens_is_refused_with_and_without_allocator():
    from mmshiftkv.allocators import PyramidAllocator

    model, tokenizer = tiny("qwen2")
    inputs = make_inputs("qwen2", tokenizer, [QUESTION, "Short?"])
    inputs["attention_mask"][1] = 0
    inputs["attention_mask"][1, -1] = 1  # only the last token real: allowed
    prefill(model, inputs, SnapKVPress(budget=BUDGET))
    inputs["attention_mask"][1, -1] = 0
    pyramid = SnapKVPress(budget=BUDGET, allocator=PyramidAllocator(window=2))
    for press in (SnapKVPress(budget=BUDGET), pyramid):
        with pytest.raises(PressUsageError):
            prefill(model, inputs, press)


def test_one_press_on_two_models_at_once_and_nested_presses_are_refused():
    model_a, tokenizer = tiny("qwen2")
    model_b, _ = build_tiny_model("qwen2", seed=1)
    press = SnapKVPress(budget=BUDGET)
    with press(model_a):
        with pytest.raises(PressUsageError, match="already active"), press(model_b):
            pass
        with pytest.raises(PressUsageError, match="already active"), press(model_a):
            pass
        other = StreamingLLMPress(budget=4)
        with pytest.raises(PressUsageError, match="presses do not nest"), other(model_a):
            pass
    # Sequential use of one press on two models is fine, and the first model's hooks are gone.
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    alone = prefill(model_b, inputs, SnapKVPress(budget=BUDGET)).layers[0].keys
    prefill(model_a, inputs, press)
    again = prefill(model_b, inputs, press).layers[0].keys
    torch.testing.assert_close(alone, again)
    assert press.stats.kept.shape == (2, 1, 2)


def test_a_compressed_cache_is_readable_only_by_its_own_model():
    model_a, tokenizer = tiny("qwen2")
    model_b, _ = build_tiny_model("qwen2", seed=1)
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    cache = prefill(model_a, inputs, SnapKVPress(budget=BUDGET))
    assert isinstance(cache.layers[0], CompressedLayer)
    step = {"input_ids": torch.tensor([[5]]), **cache_argument(model_a, cache)}
    with torch.no_grad():
        # Another model's press context is active (this thread and another): model A reads nothing.
        with FullKVPress()(model_b), pytest.raises(RuntimeError, match="model it was compressed for"):
            model_a(**step)
        errors: list[BaseException] = []

        def read_in_thread():
            try:
                model_a(**step)
            except RuntimeError as error:
                errors.append(error)

        with compressed_attention(model_b):
            thread = threading.Thread(target=read_in_thread)
            thread.start()
            thread.join()
        assert errors and "model it was compressed for" in str(errors[0])
        # Model B's attention over model A's cache is refused too.
        with compressed_attention(model_b), pytest.raises(RuntimeError, match="model it was compressed for"):
            model_b(input_ids=torch.tensor([[5]]), **cache_argument(model_b, cache))
        with compressed_attention(model_a):
            model_a(**step)  # its own model reads it


def test_output_attentions_under_a_compressing_press_is_refused():
    model, tokenizer = tiny("qwen2", "eager")
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    with pytest.raises(PressUsageError, match="output_attentions"), SnapKVPress(budget=BUDGET)(model):
        model.generate(**inputs, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    with FullKVPress()(model):  # nothing is compressed: attentions are complete
        out = model.generate(**inputs, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    assert all(a.numel() > 0 for step in out.attentions for a in step)


def test_nan_in_the_attention_input_is_refused_not_scored():
    model, tokenizer = tiny("qwen2")
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().clone()
    embeds[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prefill(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}, ShiftKVPress())


def test_chunked_prefill_equals_one_forward_and_assisted_decoding_is_refused_up_front():
    model, tokenizer = tiny("qwen2")
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    answers, kept = [], []
    for extra in ({}, {"prefill_chunk_size": 8}):
        press = SnapKVPress(budget=BUDGET)
        try:
            with press(model):
                answers.append(model.generate(**inputs, max_new_tokens=3, do_sample=False, **extra))
        except PressUsageError as error:
            # transformers 5.2 runs generate's chunks at wrong positions (tests/test_chunked_prefill.py).
            assert "wrong positions" in str(error) and extra
            break
        kept.append(press.stats.indices)
    else:
        assert torch.equal(answers[0], answers[1])
        assert all(torch.equal(a, b) for a, b in zip(*kept))
    repeated = {k: v.repeat(1, 2) for k, v in inputs.items()}  # a prompt whose n-grams repeat
    with pytest.raises(PressUsageError, match="assisted / speculative"), SnapKVPress(budget=BUDGET)(model):
        # eos_token_id: transformers 5.2's prompt-lookup candidate generator needs one.
        model.generate(
            **repeated, max_new_tokens=5, do_sample=False, prompt_lookup_num_tokens=3, eos_token_id=0
        )
    # The press context is gone after the refusal: plain generate is untouched.
    assert "generate" not in vars(model)


def test_crop_into_the_compressed_prompt_of_a_mixed_cache_cuts_nothing():
    from mmshiftkv.allocators import UniformAllocator

    model, tokenizer = tiny("qwen2")
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    cache = prefill(model, inputs, SnapKVPress(budget=BUDGET, allocator=UniformAllocator()))
    # Make layer 0 uncompressed (a mixed cache): a plain DynamicCache layer holding the whole prompt.
    full = prefill(model, inputs, FullKVPress())
    cache.layers[0] = full.layers[0]
    length = cache.get_seq_length()
    with pytest.raises(ValueError, match="compressed"):
        cache.crop(-2)
    assert cache.layers[0].get_seq_length() == length  # the uncompressed layer was not cut


def test_forgetting_to_call_the_press_on_the_model_gives_a_clear_error():
    model, _ = tiny("qwen2")
    with pytest.raises(TypeError):
        ShiftKVPress(model)  # fields are keyword-only
    with pytest.raises(TypeError, match="applied to a model"), SnapKVPress(budget=4)("not a model"):
        pass
