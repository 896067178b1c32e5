"""A request whose compaction fails (NaN scores, a raising press) fails alone; the engine serves on."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from mmshiftkv.vllm.worker import NAN_REASON  # noqa: E402
from vllm_plugin.vllm_helpers import (  # noqa: E402
    assert_kept_as_transformers,
    engine,
    scheduler_of,
    selections_of,
    transformers_generate,
)

MAX_TOKENS = 12
#: Prompt lengths: the press scores NaN for 50 tokens and raises for 60; 40 and 70 share their steps.
NAN_LEN, RAISE_LEN = 50, 60
LENGTHS = (40, NAN_LEN, RAISE_LEN, 70)


def inject_faults(worker) -> None:
    """Make the worker's press score NaN for :data:`NAN_LEN`-token prompts and raise for :data:`RAISE_LEN`."""
    press = worker.model_runner.mmshiftkv_compactor.press
    score = press.score

    def faulty_score(module, hidden_states, keys, values, attentions, kwargs):
        scores = score(module, hidden_states, keys, values, attentions, kwargs)
        if keys.shape[2] == NAN_LEN:
            return scores * float("nan")
        if keys.shape[2] == RAISE_LEN:
            raise ValueError("injected fault")
        return scores

    press.score = faulty_score


def test_failing_requests_fail_alone_and_the_engine_serves_on(model_dirs):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    folder = model_dirs("qwen2")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(2)
    batch = [torch.randint(5, 250, (n,), generator=generator).tolist() for n in LENGTHS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    # 40 + 50 + 60 tokens fill the first step: the failing prompts are compacted beside a good one.
    with engine(folder, "snapkv", max_model_len=160, max_num_batched_tokens=160) as llm:
        llm.collective_rpc(inject_faults)
        first = llm.generate([{"prompt_token_ids": p} for p in batch], params)
        # The next requests (same prompts, fresh ids) are served as usual, faults still armed.
        good = [p for p in batch if len(p) not in (NAN_LEN, RAISE_LEN)]
        second = llm.generate([{"prompt_token_ids": p} for p in good], params)
        selections = selections_of(llm)
        ledger = scheduler_of(llm).mmshiftkv_ledger
        in_use, failed = ledger.blocks_in_use(), ledger.failed

    by_len = {len(o.prompt_token_ids): o.outputs[0] for o in first}
    assert by_len[NAN_LEN].finish_reason == "error" and by_len[NAN_LEN].token_ids == []
    assert by_len[NAN_LEN].stop_reason == f"mmshiftkv: {NAN_REASON}"
    assert by_len[RAISE_LEN].finish_reason == "error" and by_len[RAISE_LEN].token_ids == []
    assert "ValueError: injected fault" in by_len[RAISE_LEN].stop_reason
    assert failed == 2
    for output in [o for o in first if len(o.prompt_token_ids) in (40, 70)] + list(second):
        inputs = {"input_ids": torch.tensor([output.prompt_token_ids])}
        tokens, stats = transformers_generate(model, inputs, "snapkv", MAX_TOKENS)
        assert output.outputs[0].finish_reason == "length"
        assert list(output.outputs[0].token_ids) == tokens, output.request_id
        assert_kept_as_transformers(selections[output.request_id], stats, output.request_id)
    assert in_use == 0  # the failed requests' blocks went back to the pool with the others
