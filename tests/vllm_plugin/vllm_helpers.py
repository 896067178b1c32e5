"""Engines and the plugin's records, shared by the vLLM plugin tests."""

from __future__ import annotations

import gc
import warnings
from contextlib import contextmanager

import torch

from mmshiftkv.registry import make_press

BUDGET = 16
BLOCK_SIZE = 32


@contextmanager
def engine(model_dir: str, press: str | None, records: dict | None = None, **options):
    """A vLLM engine on ``model_dir`` with ``press`` (None: no press) at :data:`BUDGET`, closed on exit.

    The press records kept indices and blocks, unless ``records`` sets other record options.
    """
    from vllm import LLM

    settings = dict(
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        block_size=BLOCK_SIZE,
        max_model_len=512,
        max_num_batched_tokens=512,
        seed=0,
    )
    settings.update(options)
    if press is not None:
        section = {"press": press, "budget": BUDGET, "record_selection": True, "record_blocks": True}
        settings["additional_config"] = {"mmshiftkv": {**section, **(records or {})}}
    llm = LLM(model_dir, **settings)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def scheduler_of(llm):
    """The engine's scheduler (in-process engine core)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def selections_of(llm) -> dict[str, dict]:
    """Kept indices the worker recorded, keyed by the request id ``generate`` returns."""
    (selections,) = llm.collective_rpc(lambda worker: worker.model_runner.mmshiftkv_compactor.selections)
    return {req_id.split("-")[0]: layers for req_id, layers in selections.items()}


def history_of(llm) -> dict[str, list]:
    """Per request (id as ``generate`` returns it), its block records from the KV manager."""
    ledger = scheduler_of(llm).mmshiftkv_ledger
    return {req_id.split("-")[0]: records for req_id, records in ledger.history.items()}


def transformers_generate(model, inputs: dict, press_name: str | None, max_new_tokens: int):
    """The library's own path (the oracle): greedy tokens and, under a press, its statistics."""
    prompt_len = inputs["input_ids"].shape[1]
    if press_name is None:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, prompt_len:].tolist(), None
    press = make_press(press_name, budget=BUDGET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short prompts warn that they stay uncompressed
        with press(model):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, prompt_len:].tolist(), press.stats


def assert_kept_as_transformers(kept_per_layer: dict[int, torch.Tensor], stats, label) -> None:
    """The worker's kept indices per layer equal transformers' (the first :data:`BUDGET` per head)."""
    assert len(kept_per_layer) == len(stats.indices), label
    for layer, kept in kept_per_layer.items():
        assert torch.equal(kept, stats.indices[layer][0, :, :BUDGET]), (label, layer)
