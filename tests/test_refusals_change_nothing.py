"""Every refusal leaves the model and the cache exactly as they were; a correct retry equals a fresh run.

The hybrid and sliding-window families are the hard cases: their first layers (Gemma 3's sliding
window, Qwen3.5's linear attention) come before the first compressed layer, so a refusal raised
there would come after they were changed.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from test_copies import assert_same_cache, decode, prefill, tensors_of

from mmshiftkv.cache import cache_argument, compressed_attention
from mmshiftkv.cache.compat import prompt_cache_argument
from mmshiftkv.presses import ExternalScorerPress, FullKVPress, PressUsageError, SnapKVPress
from mmshiftkv.testing import QUESTION, build_tiny_model, greedy, make_inputs, tiny

BUDGET = 8
#: Families whose cache holds uncompressed layers before the first compressed one (qwen2: made mixed).
FAMILIES = ["gemma3-text", "qwen3.5-text", "qwen2"]


def compressed_prompt(family: str):
    model, processor = tiny(family)
    if not prompt_cache_argument(model):
        pytest.skip("a press refuses Qwen3.5's own cache class on this transformers (tests/test_copies.py)")
    inputs = make_inputs(family, processor, [QUESTION])
    cache = prefill(model, inputs, SnapKVPress(budget=BUDGET))
    if family == "qwen2":  # an uncompressed first layer, as an allocator may leave one
        cache.layers[0] = prefill(model, inputs, FullKVPress()).layers[0]
    return model, inputs, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_outside_the_press_is_refused_before_any_layer_changes(family: str):
    model, inputs, cache = compressed_prompt(family)
    snapshot = copy.deepcopy(cache)
    other, _ = build_tiny_model(family, seed=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], 1)
    step = {"input_ids": torch.full_like(inputs["input_ids"][:, :1], 5), "attention_mask": mask}
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="model it was compressed for"):
            model(**step, **cache_argument(model, cache))  # no press at all
        assert_same_cache(cache, snapshot)
        with compressed_attention(other), pytest.raises(RuntimeError, match="model it was compressed for"):
            model(**step, **cache_argument(model, cache))  # another model's context is open
        with compressed_attention(other), pytest.raises(RuntimeError, match="model it was compressed for"):
            other(**step, **cache_argument(other, cache))  # another model reads it
    assert_same_cache(cache, snapshot)
    # The retry inside the press decodes what a fresh prefill and decode give.
    retried = decode(model, cache, SnapKVPress(budget=BUDGET), inputs)
    torch.testing.assert_close(retried, decode(model, snapshot, SnapKVPress(budget=BUDGET), inputs))
    if family != "qwen2":
        fresh = prefill(model, inputs, SnapKVPress(budget=BUDGET))
        torch.testing.assert_close(retried, decode(model, fresh, SnapKVPress(budget=BUDGET), inputs))


def assert_empty(cache, model) -> None:
    """``cache`` holds what a new cache of the model holds: nothing was stored in any layer."""
    (new,) = prompt_cache_argument(model).values()
    held, empty = tensors_of(cache.layers), tensors_of(new.layers)
    assert len(held) == len(empty) and all(torch.equal(a, b) for a, b in zip(held, empty))


@pytest.mark.parametrize("family", ["gemma3-text", "qwen3.5-text"])
def test_refused_prefills_leave_the_given_cache_empty(family: str):
    model, tokenizer = tiny(family)
    argument = prompt_cache_argument(model)
    if not argument:
        pytest.skip("a press refuses Qwen3.5's own cache class on this transformers (tests/test_copies.py)")
    (cache,) = argument.values()
    tokenizer.padding_side = "right"
    right_padded = dict(tokenizer([QUESTION, "Short?"], return_tensors="pt", padding=True))
    tokenizer.padding_side = "left"
    inputs = make_inputs(family, tokenizer, [QUESTION])
    with torch.no_grad():
        with pytest.raises(PressUsageError, match="right padding"), SnapKVPress(budget=BUDGET)(model):
            model(**right_padded, **argument)
        assert_empty(cache, model)
        # A press that cannot score chunks (a wrapped external scorer) refuses them before the first runs.
        chunks = pytest.raises(PressUsageError, match="cannot score a prompt prefilled in chunks")
        with chunks, ExternalScorerPress(press=SnapKVPress(), budget=BUDGET)(model):
            model.generate(**inputs, **argument, max_new_tokens=2, do_sample=False, prefill_chunk_size=8)
        assert_empty(cache, model)
        # The same cache then serves a correct run: it equals a run on a new cache.
        with SnapKVPress(budget=BUDGET)(model):
            out = model.generate(**inputs, **argument, max_new_tokens=3, do_sample=False)
        with SnapKVPress(budget=BUDGET)(model):
            new = prompt_cache_argument(model)
            expected = model.generate(**inputs, **new, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------ threads


def test_another_thread_running_the_model_while_a_press_is_open_is_refused():
    model, tokenizer = tiny("qwen2")
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    with torch.no_grad():
        plain = greedy(model, inputs)
        with SnapKVPress(budget=BUDGET)(model):
            compressed = greedy(model, inputs)
    assert not torch.equal(plain, compressed)  # the press changes this model's answer
    errors: list[BaseException] = []

    def plain_generate_elsewhere() -> None:
        for call in (lambda: greedy(model, inputs), lambda: model(**inputs)):
            try:
                with torch.no_grad():
                    call()
            except PressUsageError as error:
                errors.append(error)

    press = SnapKVPress(budget=BUDGET)
    with press(model), torch.no_grad():
        thread = threading.Thread(target=plain_generate_elsewhere, name="worker")
        thread.start()
        thread.join()
        inside = greedy(model, inputs)  # the owner thread is unaffected
    assert len(errors) == 2
    assert all("opened in thread 'MainThread'" in str(e) and "'worker'" in str(e) for e in errors)
    assert torch.equal(inside, compressed)
    # After the block the other thread runs the plain model.
    results: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: results.append(greedy(model, inputs)))
    thread.start()
    thread.join()
    assert torch.equal(results[0], plain)


def test_two_threads_each_with_its_own_model_and_press():
    model_a, tokenizer = tiny("qwen2")
    model_b, _ = build_tiny_model("qwen2", seed=1)
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    expected = {}
    for name, model in (("a", model_a), ("b", model_b)):
        with torch.no_grad(), SnapKVPress(budget=BUDGET)(model):
            expected[name] = greedy(model, inputs, max_new_tokens=8)
    start, results = threading.Barrier(2), {}

    def run(name: str, model) -> None:
        start.wait()
        with torch.no_grad(), SnapKVPress(budget=BUDGET)(model):
            results[name] = greedy(model, inputs, max_new_tokens=8)

    threads = [threading.Thread(target=run, args=item) for item in (("a", model_a), ("b", model_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(results[name], expected[name]) for name in expected)


# ------------------------------------------------------------------------------- prompt lookup


def test_prompt_lookup_is_refused_only_when_the_first_forward_holds_candidates():
    model, tokenizer = tiny("qwen2")
    inputs = make_inputs("qwen2", tokenizer, [QUESTION])
    lookup = dict(max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3, eos_token_id=0)
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: forwards.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with torch.no_grad(), SnapKVPress(budget=BUDGET)(model):
            expected = model.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=0)
            forwards.clear()
            # The prompt's last tokens do not recur in it: the first forward is the prompt alone.
            out = model.generate(**inputs, **lookup)
    finally:
        hook.remove()
    assert forwards[0] == inputs["input_ids"].shape[1]
    assert any(n > 1 for n in forwards[1:]), "no candidates were verified: the test would prove nothing"
    assert torch.equal(out, expected)  # verified candidates give the press's greedy output
    repeated = {k: v.repeat(1, 2) for k, v in inputs.items()}  # the last n-gram recurs: candidates at once
    with pytest.raises(PressUsageError, match="assisted / speculative"), SnapKVPress(budget=BUDGET)(model):
        model.generate(**repeated, **lookup)
