"""Serve prefill-time KV compression in vLLM: the library's presses as a vLLM general plugin.

Install ``mmshiftkv[vllm]``; vLLM loads the plugin by itself (entry point group
``vllm.general_plugins``). A press is enabled per engine through ``additional_config``::

    from vllm import LLM
    llm = LLM(model, enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
              additional_config={"mmshiftkv": {"press": "shiftkv", "budget": 64}})

At the end of each prompt's prefill every KV head keeps ``budget`` prompt tokens (its own ones,
chosen by the press's ``score()``, the same code as in transformers), compacted into the request's
first slots; the emptied blocks return to vLLM's pool, generated tokens keep their logical RoPE
positions. See :mod:`mmshiftkv.vllm.worker` and :mod:`mmshiftkv.vllm.scheduler`.

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
