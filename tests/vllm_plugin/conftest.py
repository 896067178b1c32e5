"""Fixtures of the vLLM plugin tests; they run only where vLLM is installed (the separate vLLM venv)."""

from __future__ import annotations

import os

import pytest

# Before any engine starts: one process (the tests read the scheduler and the workers in place), a small
# CPU KV pool, nothing downloaded.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Folder of a saved tiny servable model per family, built once per session."""
    from mmshiftkv.testing.vllm_models import save_servable_tiny_model

    root = tmp_path_factory.mktemp("vllm-models")
    cache: dict[str, str] = {}

    def folder(family: str) -> str:
        if family not in cache:
            cache[family] = str(save_servable_tiny_model(family, root / family))
        return cache[family]

    return folder
