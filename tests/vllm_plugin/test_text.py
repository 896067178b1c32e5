"""vLLM + press on a tiny Qwen2 equals transformers + the same press; emptied blocks go back to the pool."""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vllm_plugin import vllm_helpers as helpers  # noqa: E402
from vllm_plugin.vllm_helpers import (  # noqa: E402
    BLOCK_SIZE,
    BUDGET,
    assert_kept_as_transformers,
    engine,
    history_of,
    scheduler_of,
    selections_of,
)

#: Prompts of different lengths submitted together: two longer than one block, one within the budget.
PROMPT_LENGTHS = (40, 70, 100, 12)
#: Long enough for the compacted requests to cross a block boundary while decoding (16 + 40 > 32).
MAX_TOKENS = 40
#: 40 + 70 fit the first step, 100 + 12 wait for the second, which also decodes the first two: the
#: second step compacts prompts while requests compacted in the first step decode beside them.
BATCH_TOKENS = 160


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(5, 250, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def transformers_generate(model, prompt: list[int], press_name: str | None):
    return helpers.transformers_generate(model, {"input_ids": torch.tensor([prompt])}, press_name, MAX_TOKENS)


def vllm_generate(llm, batch: list[list[int]]) -> dict[str, list[int]]:
    from vllm import SamplingParams

    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in batch], SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    )
    return {o.request_id: list(o.outputs[0].token_ids) for o in outputs}


@pytest.fixture(scope="module")
def text_models(model_dirs):
    """Per family: the saved folder and the transformers model (loaded once)."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def load(family: str):
        if family not in loaded:
            folder = model_dirs(family)
            loaded[family] = folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return loaded[family]

    return load


@pytest.fixture(scope="module")
def qwen2(text_models):
    return text_models("qwen2")


def test_engine_without_press_matches_transformers(qwen2):
    folder, model = qwen2
    batch = prompts()
    with engine(folder, None, max_model_len=BATCH_TOKENS, max_num_batched_tokens=BATCH_TOKENS) as llm:
        served = vllm_generate(llm, batch)
        assert not hasattr(scheduler_of(llm), "mmshiftkv_ledger")
    for i, prompt in enumerate(batch):
        assert served[str(i)] == transformers_generate(model, prompt, None)[0]


@pytest.mark.parametrize(
    ("family", "press_name"),
    [
        *[
            ("qwen2", press)
            for press in ("shiftkv", "snapkv", "streaming_llm", "keydiff", "expected_attention", "last_attn")
        ],
        ("qwen3", "shiftkv"),  # queries through the per-head q_norm
    ],
)
def test_press_matches_transformers_and_returns_blocks(text_models, family, press_name):
    folder, model = text_models(family)
    batch = prompts()
    with engine(folder, press_name, max_model_len=BATCH_TOKENS, max_num_batched_tokens=BATCH_TOKENS) as llm:
        served = vllm_generate(llm, batch)
        selections = selections_of(llm)
        history = history_of(llm)
        usage = scheduler_of(llm).mmshiftkv_ledger.usage

    compacted = {str(i) for i, n in enumerate(PROMPT_LENGTHS) if n > BUDGET}
    assert set(selections) == compacted
    for i, prompt in enumerate(batch):
        req_id = str(i)
        tokens, stats = transformers_generate(model, prompt, press_name)
        assert served[req_id] == tokens, f"request {i} ({len(prompt)} tokens)"
        if req_id in compacted:
            assert_kept_as_transformers(selections[req_id], stats, f"request {i}")

    # Blocks held, as vLLM's KV manager reports them after every step: the kept prompt plus the
    # generated tokens, rounded up to blocks; requests within the budget hold their whole prompt.
    for req_id, records in history.items():
        prompt_len = records[0].prompt_len
        held = min(prompt_len, BUDGET)
        for record in records:
            generated = record.tokens - prompt_len
            assert record.blocks == math.ceil((held + generated) / BLOCK_SIZE), (req_id, record)
    assert max(r.blocks for r in history["2"]) == 2  # a compacted request grew past its first block
    assert history["2"][0].blocks == 1  # 100 prompt tokens (4 blocks) compacted into 1
    # Every block in use belongs to a running request: the emptied ones are back in the pool.
    assert all(in_use == held for in_use, held in usage)


def test_preempted_requests_are_compacted_again(qwen2):
    folder, _ = qwen2
    generator = torch.Generator().manual_seed(1)
    batch = [torch.randint(5, 250, (96,), generator=generator).tolist() for _ in range(8)]
    # 10 blocks: a prefill needs 3, a compacted request 1 then 2 once it passes 32 tokens, so
    # growing requests run out of blocks and vLLM preempts (frees and later recomputes) some.
    with engine(
        folder, "snapkv", num_gpu_blocks_override=11, max_model_len=160, max_num_batched_tokens=160
    ) as llm:
        served = vllm_generate(llm, batch)
        history = history_of(llm)
        usage = scheduler_of(llm).mmshiftkv_ledger.usage
    assert all(len(tokens) == MAX_TOKENS for tokens in served.values())
    preempted = [req_id for req_id, records in history.items() if records[-1].preemptions]
    assert preempted, "no request was preempted: the pool is too large for this test"
    for records in history.values():
        for record in records:
            generated = record.tokens - record.prompt_len
            assert record.blocks == math.ceil((BUDGET + generated) / BLOCK_SIZE), record
    assert all(in_use == held for in_use, held in usage)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel CPU workers need two cores")
def test_tensor_parallel_workers_each_compact_their_heads(qwen2, monkeypatch):
    from vllm import SamplingParams

    from mmshiftkv.vllm.worker import OTHER_RANK_REASON

    folder, model = qwen2
    nan_len = 30  # rank 1 alone scores NaN for this prompt: the request fails, reported by rank 0
    batch = [*prompts()[:3], prompts()[0][:nan_len]]

    def nan_on_rank_1(worker):
        press = worker.model_runner.mmshiftkv_compactor.press
        score = press.score

        def faulty_score(module, hidden_states, keys, values, attentions, kwargs):
            scores = score(module, hidden_states, keys, values, attentions, kwargs)
            return scores * float("nan") if worker.rank == 1 and keys.shape[2] == nan_len else scores

        press.score = faulty_score

    # Two worker processes (the plugin loads there through its entry point), one core each.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    options = dict(tensor_parallel_size=2, distributed_executor_backend="mp", max_model_len=BATCH_TOKENS)
    with engine(folder, "shiftkv", max_num_batched_tokens=BATCH_TOKENS, **options) as llm:
        llm.collective_rpc(nan_on_rank_1)
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in batch], SamplingParams(max_tokens=8, temperature=0)
        )
        per_rank = llm.collective_rpc(lambda worker: worker.model_runner.mmshiftkv_compactor.selections)
        history = history_of(llm)
    *served, failed = outputs
    assert failed.outputs[0].finish_reason == "error"
    assert failed.outputs[0].stop_reason == f"mmshiftkv: {OTHER_RANK_REASON}"
    for output, prompt in zip(served, batch):
        tokens, stats = transformers_generate(model, prompt, "shiftkv")
        assert list(output.outputs[0].token_ids) == tokens[:8]
        (req_id,) = [r for r in per_rank[0] if r.split("-")[0] == output.request_id]
        for layer in per_rank[0][req_id]:
            # Rank r holds KV head r of the two: together they kept what transformers kept.
            kept = torch.cat([rank[req_id][layer] for rank in per_rank])
            assert torch.equal(kept, stats.indices[layer][0, :, :BUDGET])
        for record in history[output.request_id]:
            generated = record.tokens - record.prompt_len
            assert record.blocks == math.ceil((BUDGET + generated) / BLOCK_SIZE)


def test_served_shiftkv_scores_with_the_compiled_op(qwen2):
    """In vLLM's own torch, ShiftKV runs the compiled op (built for it by the venv's set-up), not the
    torch reference."""
    from torch.profiler import ProfilerActivity, profile

    from mmshiftkv.ops import available, compiled

    assert available()["cpu"], compiled.LOAD_ERROR
    folder, model = qwen2
    prompt = prompts()[1]
    options = dict(max_model_len=BATCH_TOKENS, max_num_batched_tokens=BATCH_TOKENS)
    with engine(folder, "shiftkv", **options) as llm, profile(activities=[ProfilerActivity.CPU]) as profiler:
        served = vllm_generate(llm, [prompt])
    calls = {event.key: event.count for event in profiler.key_averages()}
    # One call per decoder layer of the one compacted prompt.
    assert calls.get("mmshiftkv::shiftkv_scores") == model.config.num_hidden_layers
    assert served["0"] == transformers_generate(model, prompt, "shiftkv")[0]
