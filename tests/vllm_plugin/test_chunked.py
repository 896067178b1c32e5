"""Chunked prefill: vLLM + press with prompts split over steps equals transformers + the same press one-shot.

vLLM schedules each prompt in chunks of at most ``max_num_batched_tokens`` tokens, several requests'
chunks and decoding requests in one step; the worker gathers the press's statistics chunk by chunk,
scores the prompt at its last chunk against the keys and values of every chunk read back from the
paged cache, and compacts. The oracle is the library's transformers path with the whole prompt in one
forward. One engine per model serves every press (swapped between batches on the worker).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmshiftkv.registry import make_press  # noqa: E402
from mmshiftkv.vllm import VLLM_PRESSES, EngineConfigError  # noqa: E402
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

MAX_TOKENS = 10
#: Text prompts submitted together: 2 to 5 chunks of at most :data:`CHUNK` tokens, one within the budget.
TEXT_LENGTHS = (40, 70, 150, 12, 100)
#: Tokens vLLM runs per step (``max_num_batched_tokens``): small, so that prompts span several steps.
CHUNK = 32
#: One 112 x 112 image (16 tokens) per request, text of different lengths around it.
TEXT_REPEATS = (1, 4, 9)


def run_steps(llm, requests: list, params) -> tuple[list, list[dict[str, tuple[int, int, int]]]]:
    """Generate, and per step each scheduled request's (tokens computed before, scheduled, prompt tokens)."""
    scheduler = scheduler_of(llm)
    schedule = scheduler.schedule
    steps = []

    def recording_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        step = {}
        for req_id, n in output.num_scheduled_tokens.items():
            request = scheduler.requests[req_id]
            step[req_id.split("-")[0]] = (request.num_computed_tokens - n, n, request.num_prompt_tokens)
        steps.append(step)
        return output

    scheduler.schedule = recording_schedule
    try:
        outputs = llm.generate(requests, params)
    finally:
        del scheduler.schedule
    return outputs, steps


def use_press(llm, press_name: str) -> None:
    """Make every worker score with ``press_name`` from the next batch on (the budget stays)."""

    def swap(worker):
        compactor = worker.model_runner.mmshiftkv_compactor
        compactor.press = make_press(press_name, budget=compactor.config.budget)

    llm.collective_rpc(swap)


def chunk_states(llm) -> list[dict]:
    return llm.collective_rpc(lambda worker: dict(worker.model_runner.mmshiftkv_compactor.chunked))


def assert_chunked_and_batched(steps: list[dict]) -> None:
    """The schedule this test is about: prompts in several chunks, chunks beside decodes and each other."""
    chunks = {}
    for step in steps:
        for req_id, (computed, _n, prompt_len) in step.items():
            if computed < prompt_len:
                chunks[req_id] = chunks.get(req_id, 0) + 1
    assert max(chunks.values()) >= 4 and sorted(chunks.values())[-2] >= 2, chunks
    mid_prefill = [
        {r for r, (c, n, p) in step.items() if c < p and c + n < p} for step in steps
    ]  # a chunk that is not its prompt's last
    decoding = [{r for r, (c, n, p) in step.items() if c >= p} for step in steps]
    prefilling = [{r for r, (c, n, p) in step.items() if c < p} for step in steps]
    assert any(m and d for m, d in zip(mid_prefill, decoding)), "no step ran a chunk beside a decode"
    assert any(len(p) >= 2 and m for p, m in zip(prefilling, mid_prefill)), "no step ran two prompts' chunks"


def assert_blocks_follow_the_prompt(history: dict[str, list], compacted: set[str]) -> None:
    """Earlier chunks hold all their slots; from the last chunk on, the kept prompt plus what follows."""
    for req_id, records in history.items():
        for record in records:
            if req_id in compacted and record.tokens >= record.prompt_len:
                held = BUDGET + record.tokens - record.prompt_len
            else:
                held = record.tokens
            assert record.blocks == math.ceil(held / BLOCK_SIZE), (req_id, record)


@pytest.fixture(scope="module")
def text_model(model_dirs):
    from transformers import AutoModelForCausalLM

    folder = model_dirs("qwen2")
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_chunked_text_prompts_match_one_shot_transformers_for_every_press(text_model):
    from vllm import SamplingParams

    folder, model = text_model
    generator = torch.Generator().manual_seed(3)
    batch = [torch.randint(5, 250, (n,), generator=generator).tolist() for n in TEXT_LENGTHS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    options = dict(enable_chunked_prefill=True, max_num_batched_tokens=CHUNK, max_model_len=256)
    with engine(folder, VLLM_PRESSES[0], **options) as llm:
        for press_name in VLLM_PRESSES:
            use_press(llm, press_name)
            outputs, steps = run_steps(llm, [{"prompt_token_ids": p} for p in batch], params)
            assert_chunked_and_batched(steps)
            selections = selections_of(llm)
            history = history_of(llm)
            (states,) = chunk_states(llm)
            assert not states, f"{press_name}: chunk states left after every prompt completed: {states}"
            compacted = set()
            for output in outputs:
                prompt = list(output.prompt_token_ids)
                tokens, stats = transformers_generate(
                    model, {"input_ids": torch.tensor([prompt])}, press_name, MAX_TOKENS
                )
                label = f"{press_name}, {len(prompt)}-token prompt"
                assert list(output.outputs[0].token_ids) == tokens, label
                if len(prompt) > BUDGET:
                    compacted.add(output.request_id)
                    assert_kept_as_transformers(selections[output.request_id], stats, label)
            assert_blocks_follow_the_prompt(
                {r: history[r] for r in (o.request_id for o in outputs)}, compacted
            )
        assert scheduler_of(llm).mmshiftkv_ledger.blocks_in_use() == 0


def image_prompt(processor, repeats: int) -> str:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe it " * repeats}]}
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_chunked_image_prompts_match_one_shot_transformers_for_every_press(model_dirs):
    """Qwen2.5-VL (M-RoPE): an image crosses a chunk boundary in every request."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import SamplingParams

    folder = model_dirs("qwen2.5-vl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in TEXT_REPEATS]
    batch = [(image_prompt(processor, repeats), image) for repeats, image in zip(TEXT_REPEATS, images)]
    inputs = [processor(text=[text], images=[image], return_tensors="pt") for text, image in batch]
    image_token = model.config.image_token_id
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    options = dict(
        enable_chunked_prefill=True,
        max_num_batched_tokens=16,  # chunks of at most 16 tokens: the 16 image tokens (7 to 22) are cut
        max_model_len=256,
        limit_mm_per_prompt={"image": 1, "video": 0},
    )
    with engine(folder, VLLM_PRESSES[0], **options) as llm:
        for press_name in VLLM_PRESSES:
            use_press(llm, press_name)
            requests = [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in batch]
            outputs, steps = run_steps(llm, requests, params)
            assert_chunked_and_batched(steps)
            selections = selections_of(llm)
            history = history_of(llm)
            (states,) = chunk_states(llm)
            assert not states, press_name
            assert_blocks_follow_the_prompt(history, set(history))  # every image prompt exceeds the budget
            for output, prompt_inputs in zip(outputs, inputs):
                ids = prompt_inputs["input_ids"][0]
                assert output.prompt_token_ids == ids.tolist()
                image_at = torch.nonzero(ids == image_token)[:, 0]
                boundaries = {c + n for step in steps for c, n, p in [step.get(output.request_id, (0, 0, 0))]}
                assert any(image_at[0] < b <= image_at[-1] for b in boundaries), (
                    output.request_id,
                    boundaries,
                )
                tokens, stats = transformers_generate(model, prompt_inputs, press_name, MAX_TOKENS)
                label = f"{press_name}, request {output.request_id}"
                assert list(output.outputs[0].token_ids) == tokens, label
                assert_kept_as_transformers(selections[output.request_id], stats, label)


def test_a_press_failing_on_an_early_chunk_fails_alone_and_its_state_is_dropped(text_model):
    """The press raises while gathering one prompt's early chunk: that request fails, the others are
    served, and its chunk state leaves with it."""
    from vllm import SamplingParams

    folder, model = text_model
    generator = torch.Generator().manual_seed(5)
    failing = [7] * 90  # one token repeated: the only prompt whose chunk rows are identical in layer 0
    batch = [torch.randint(5, 250, (60,), generator=generator).tolist(), failing]
    batch.append(torch.randint(5, 250, (45,), generator=generator).tolist())

    def fault_on_repeated_tokens(worker):
        press = worker.model_runner.mmshiftkv_compactor.press
        accumulate = press.accumulate_chunk

        def faulty(module, hidden_states, real, keys, previous):
            rows = hidden_states[0]
            if module.layer_idx == 0 and rows.shape[0] >= 2 and bool((rows == rows[:1]).all()):
                raise ValueError("injected fault")
            return accumulate(module, hidden_states, real, keys, previous)

        press.accumulate_chunk = faulty

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    options = dict(enable_chunked_prefill=True, max_num_batched_tokens=CHUNK, max_model_len=256)
    with engine(folder, "shiftkv", **options) as llm:
        llm.collective_rpc(fault_on_repeated_tokens)
        first = llm.generate([{"prompt_token_ids": p} for p in batch], params)
        # The failed request left the worker in the steps that followed it.
        (states_after_first,) = chunk_states(llm)
        second = llm.generate([{"prompt_token_ids": batch[0]}], params)
        (states,) = chunk_states(llm)
        (runner,) = llm.collective_rpc(lambda worker: worker.model_runner)
        ledger = scheduler_of(llm).mmshiftkv_ledger
        in_use, failed = ledger.blocks_in_use(), ledger.failed
    assert not states_after_first and not states
    assert set(runner.mmshiftkv_compactor.shifts) <= set(runner.requests)
    by_len = {len(o.prompt_token_ids): o.outputs[0] for o in first}
    assert by_len[len(failing)].finish_reason == "error" and by_len[len(failing)].token_ids == []
    assert "ShiftKVPress failed in layer 0: ValueError: injected fault" in by_len[len(failing)].stop_reason
    assert failed == 1 and in_use == 0
    for output in [o for o in first if len(o.prompt_token_ids) != len(failing)] + list(second):
        tokens, _ = transformers_generate(
            model, {"input_ids": torch.tensor([output.prompt_token_ids])}, "shiftkv", MAX_TOKENS
        )
        assert list(output.outputs[0].token_ids) == tokens, output.request_id


def test_a_paged_cache_reader_that_reads_wrong_is_refused_at_engine_start(model_dirs, monkeypatch):
    from mmshiftkv.vllm import paged

    read = paged.BlockMap.read

    def off_by_one_slot(self, flat, block_ids, n_tokens):
        return read(self, flat, block_ids, n_tokens).roll(1, dims=0)

    monkeypatch.setattr(paged.BlockMap, "read", off_by_one_slot)
    with (
        pytest.raises(EngineConfigError, match="CPUAttentionBackendImpl's KV cache.*do not read back"),
        engine(model_dirs("qwen2"), "snapkv"),
    ):
        pass


def test_requests_preempted_between_chunks_restart_their_prompt_state(text_model):
    """A small pool: vLLM preempts requests (frees their blocks, recomputes them from scratch later),
    some between two chunks of their prompt. Those restart their chunk state and still equal
    transformers one-shot; every block returns to the pool and no state is left."""
    from vllm import SamplingParams

    folder, model = text_model
    generator = torch.Generator().manual_seed(6)
    batch = [torch.randint(5, 250, (96,), generator=generator).tolist() for _ in range(8)]
    params = SamplingParams(max_tokens=40, temperature=0)
    options = dict(
        enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK,
        max_model_len=160,
        num_gpu_blocks_override=11,
    )
    with engine(folder, "snapkv", **options) as llm:
        outputs, steps = run_steps(llm, [{"prompt_token_ids": p} for p in batch], params)
        selections = selections_of(llm)
        history = history_of(llm)
        (states,) = chunk_states(llm)
        usage = scheduler_of(llm).mmshiftkv_ledger.usage
    assert all(len(o.outputs[0].token_ids) == 40 for o in outputs)
    assert not states
    assert all(in_use == held for in_use, held in usage)
    assert_blocks_follow_the_prompt(history, set(history))

    restarted, after_prompt = set(), set()
    for req_id in history:
        computed = [step[req_id][0] for step in steps if req_id in step]
        for before, now in zip(computed, computed[1:]):
            if now < before:  # preempted in between: recomputed from scratch
                (restarted if before < len(batch[0]) else after_prompt).add(req_id)
    mid_prefill = restarted - after_prompt
    assert mid_prefill, (
        f"no request was preempted between chunks of its prompt ({restarted=}, {after_prompt=})"
    )
    for output in outputs:
        if output.request_id in mid_prefill:
            tokens, stats = transformers_generate(
                model, {"input_ids": torch.tensor([output.prompt_token_ids])}, "snapkv", 40
            )
            assert list(output.outputs[0].token_ids) == tokens, output.request_id
            assert_kept_as_transformers(selections[output.request_id], stats, output.request_id)
