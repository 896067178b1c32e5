"""vLLM + press on a tiny Qwen2 equals transformers + the same press; emptied blocks go back to the pool."""

from __future__ import annotations

import math
import os
import warnings

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from mmshiftkv.registry import make_press  # noqa: E402
from vllm_plugin.vllm_helpers import BLOCK_SIZE, BUDGET, engine, history_of, scheduler_of, selections_of  # noqa: E402

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
    """The library's own path: greedy tokens and, under a press, its kept indices per layer."""
    ids = torch.tensor([prompt])
    if press_name is None:
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        return out[0, len(prompt) :].tolist(), None
    press = make_press(press_name, budget=BUDGET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short prompts warn that they stay uncompressed
        with press(model):
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(prompt) :].tolist(), press.stats


def vllm_generate(llm, batch: list[list[int]]) -> dict[str, list[int]]:
    from vllm import SamplingParams

    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in batch], SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    )
    return {o.request_id: list(o.outputs[0].token_ids) for o in outputs}


@pytest.fixture(scope="module")
def qwen2(model_dirs):
    from transformers import AutoModelForCausalLM

    folder = model_dirs("qwen2")
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_engine_without_press_matches_transformers(qwen2):
    folder, model = qwen2
    batch = prompts()
    with engine(folder, None, max_model_len=BATCH_TOKENS, max_num_batched_tokens=BATCH_TOKENS) as llm:
        served = vllm_generate(llm, batch)
        assert not hasattr(scheduler_of(llm), "mmshiftkv_ledger")
    for i, prompt in enumerate(batch):
        assert served[str(i)] == transformers_generate(model, prompt, None)[0]


@pytest.mark.parametrize(
    "press_name", ["shiftkv", "snapkv", "streaming_llm", "keydiff", "expected_attention", "last_attn"]
)
def test_press_matches_transformers_and_returns_blocks(qwen2, press_name):
    folder, model = qwen2
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
            for layer, kept in selections[req_id].items():
                assert kept.shape == (2, BUDGET)
                assert torch.equal(kept, stats.indices[layer][0, :, :BUDGET]), f"request {i} layer {layer}"

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

    folder, model = qwen2
    batch = prompts()[:3]
    # Two worker processes (the plugin loads there through its entry point), one core each.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    options = dict(tensor_parallel_size=2, distributed_executor_backend="mp", max_model_len=BATCH_TOKENS)
    with engine(folder, "shiftkv", max_num_batched_tokens=BATCH_TOKENS, **options) as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in batch], SamplingParams(max_tokens=8, temperature=0)
        )
        per_rank = llm.collective_rpc(lambda worker: worker.model_runner.mmshiftkv_compactor.selections)
        history = history_of(llm)
    for output, prompt in zip(outputs, batch):
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
