"""A soak run: a few thousand requests of mixed lengths, text and images, through one engine with a press.

What an engine left running needs: memory that does not grow with the requests served (the
plugin's records are bounded, its per-request state leaves with the request, the process's RSS
stays flat), every KV block back in the pool at the end, and outputs that still equal
transformers + the same press after thousands of requests (a sampled subset of the last ones).
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vllm_plugin.vllm_helpers import (  # noqa: E402
    assert_kept_as_transformers,
    engine,
    scheduler_of,
    transformers_generate,
)

#: Rounds of requests, each submitted at once; every fourth request carries an image.
ROUNDS, PER_ROUND = 8, 250
#: Tokens generated: most requests stay within their first block after compaction (16 + 6 <= 32);
#: every eighth grows into a second one.
MAX_TOKENS, LONG_MAX_TOKENS = 6, 24
#: Kept indices are recorded for the last requests only (the records are bounded).
RECORD_LIMIT = 64
#: A small pool (24 blocks of 32 tokens: 3 uncompressed 200-token prompts), full at its peak, so that
#: blocks are taken and given back all the time.
POOL_BLOCKS = 24
#: Loose bound on the RSS growth over the second half of the run, 1,000 requests (stated in the
#: README). The process's RSS rises over the first rounds with or without a press, as vLLM and the
#: allocators warm up to the workload (here +110 MB over the first four rounds with ShiftKV, as
#: much without a press), then flattens (+51 MB over the last four, +5 MB a round after eight);
#: keeping 128 KB per request (half a 512-token prompt's hidden states) would exceed the bound.
RSS_GROWTH_MB = 128
#: Requests of the last round compared with transformers, with an image and text only.
SAMPLED_PER_KIND = 3


def rss_mb() -> float:
    """Resident set size of this process (the in-process engine and its worker), in MB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def workload(processor, seed: int) -> list[dict]:
    """One round: text prompts of 8-200 random tokens; image prompts of 1-20 repeated phrases."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(PER_ROUND):
        if i % 4 == 3:
            phrase = "what is it " * int(rng.integers(1, 21))
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": phrase}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            image = Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
            requests.append({"prompt": text, "multi_modal_data": {"image": image}})
        else:
            requests.append({"prompt_token_ids": rng.integers(5, 250, rng.integers(8, 201)).tolist()})
    return requests


def test_thousands_of_requests_leave_no_trace(model_dirs):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import SamplingParams

    folder = model_dirs("qwen2.5-vl")
    processor = AutoProcessor.from_pretrained(folder)
    lengths = [LONG_MAX_TOKENS if i % 8 == 5 else MAX_TOKENS for i in range(PER_ROUND)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    settings = dict(
        limit_mm_per_prompt={"image": 1, "video": 0},
        num_gpu_blocks_override=POOL_BLOCKS + 1,  # + vLLM's null block
        disable_log_stats=False,  # per-request metrics: preemptions
        mm_processor_cache_gb=0,  # vLLM's own cache of processed images grows up to its 4 GiB by design
    )
    records = {"record_limit": RECORD_LIMIT, "record_blocks": False}  # block records off, as in serving
    with engine(folder, "shiftkv", records, **settings) as llm:
        scheduler = scheduler_of(llm)
        ledger = scheduler.mmshiftkv_ledger
        (runner,) = llm.collective_rpc(lambda worker: worker.model_runner)
        compactor = runner.mmshiftkv_compactor
        for round_index in range(ROUNDS):
            batch = workload(processor, seed=round_index)
            outputs = llm.generate(batch, params, use_tqdm=False)
            assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
            # Only the last round's outputs are kept (the ones the sampled subset comes from).
            last = {o.request_id: (request, o) for request, o in zip(batch, outputs)}
            del outputs
            gc.collect()
            if round_index == ROUNDS // 2 - 1:
                rss_start = rss_mb()
            # Nothing of the finished requests stays on the scheduler or the worker.
            assert ledger.blocks_in_use() == 0
            assert not ledger.shifts and not ledger._pending
            assert set(compactor.shifts) <= set(runner.requests)
        last_selections = dict(compactor.selections)
        rss_growth = rss_mb() - rss_start
        failed, peak_blocks = ledger.failed, ledger.peak_blocks

    assert failed == 0
    assert not ledger.history and not ledger.usage  # off by default
    assert len(last_selections) == RECORD_LIMIT  # bounded: only the last requests' kept indices
    assert rss_growth < RSS_GROWTH_MB, f"RSS grew by {rss_growth:.1f} MB over the last {ROUNDS // 2} rounds"
    assert peak_blocks == POOL_BLOCKS

    # The last requests still equal transformers + the same press: tokens (up to the first end-of-
    # sequence token, where transformers stops and vLLM, told to ignore it, goes on) and kept indices.
    # Preempted requests are left out: their replayed tokens were recomputed against the whole prompt.
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    recorded = {req_id.split("-")[0]: kept for req_id, kept in last_selections.items()}
    unpreempted = [r for r, (_, out) in last.items() if r in recorded and not out.metrics.num_preemptions]
    with_image = [r for r in unpreempted if "multi_modal_data" in last[r][0]]
    text_only = [r for r in unpreempted if "multi_modal_data" not in last[r][0]]
    sampled = with_image[-SAMPLED_PER_KIND:] + text_only[-SAMPLED_PER_KIND:]
    assert len(sampled) == 2 * SAMPLED_PER_KIND
    for req_id in sampled:
        request, output = last[req_id]
        if "multi_modal_data" in request:
            image = request["multi_modal_data"]["image"]
            inputs = processor(text=[request["prompt"]], images=[image], return_tensors="pt")
        else:
            inputs = {"input_ids": torch.tensor([request["prompt_token_ids"]])}
        tokens, stats = transformers_generate(model, inputs, "shiftkv", len(output.outputs[0].token_ids))
        assert list(output.outputs[0].token_ids[: len(tokens)]) == tokens, req_id
        assert_kept_as_transformers(recorded[req_id], stats, req_id)
