"""Serve prefill-time KV compression in vLLM: the library's presses as a vLLM general plugin.

Install ``mmshiftkv[vllm]``; vLLM loads the plugin by itself (entry point group
``vllm.general_plugins``). A press is enabled per engine through ``additional_config``::

    from vllm import LLM
    llm = LLM(model, enforce_eager=True, enable_prefix_caching=False, async_scheduling=False,
              enable_chunked_prefill=True, max_num_batched_tokens=2048,
              additional_config={"mmshiftkv": {"press": "shiftkv", "budget": 64}})

At the end of each prompt's prefill every KV head keeps ``budget`` prompt tokens (its own ones,
chosen by the press's ``score()``, the same code as in transformers), compacted into the request's
first slots; the emptied blocks return to vLLM's pool, generated tokens keep their logical RoPE
positions. A prompt prefilled in chunks is scored after its last chunk from what each chunk added
(a :class:`~mmshiftkv.presses.chunked.ChunkedPrefill` per request, ``ChunkedPrefill.nbytes`` of
state until then) and the keys of every chunk, read back from the paged cache. See
:mod:`mmshiftkv.vllm.worker`, :mod:`mmshiftkv.vllm.scheduler` and :mod:`mmshiftkv.vllm.paged`.

This package imports vLLM lazily: importing it without vLLM installed works (only :func:`register`
needs vLLM).
"""

from mmshiftkv.vllm.config import (
    CONFIG_KEY,
    VLLM_PRESSES,
    EngineConfigError,
    VLLMPressConfig,
    check_engine_config,
)
from mmshiftkv.vllm.plugin import SUPPORTED_VLLM, register, vllm_version_supported

__all__ = [
    "CONFIG_KEY",
    "SUPPORTED_VLLM",
    "VLLM_PRESSES",
    "EngineConfigError",
    "VLLMPressConfig",
    "check_engine_config",
    "register",
    "vllm_version_supported",
]
