"""Engines and the plugin's records, shared by the vLLM plugin tests."""

from __future__ import annotations

import gc
from contextlib import contextmanager

BUDGET = 16
BLOCK_SIZE = 32


@contextmanager
def engine(model_dir: str, press: str | None, **options):
    """A vLLM engine on ``model_dir`` with ``press`` (None: no press) at :data:`BUDGET`, closed on exit."""
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
        settings["additional_config"] = {
            "mmshiftkv": {"press": press, "budget": BUDGET, "record_selection": True, "record_blocks": True}
        }
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
