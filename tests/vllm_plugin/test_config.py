"""The plugin refuses engine settings and press configurations it cannot serve correctly, saying why."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from mmshiftkv.vllm import (  # noqa: E402
    EngineConfigError,
    VLLMPressConfig,
    check_engine_config,
    vllm_version_supported,
)
from vllm_plugin.vllm_helpers import engine  # noqa: E402


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.32.0", True), ("0.32.5+cpu", True), ("0.33.0", False), ("0.31.9", False), ("1.0.0", False)],
)
def test_version_range(version, supported):
    assert vllm_version_supported(version) is supported


def test_installed_vllm_is_supported():
    import vllm

    assert vllm_version_supported(vllm.__version__)


def test_plugin_is_registered_as_a_general_plugin():
    from importlib.metadata import entry_points

    from mmshiftkv.vllm import register

    assert register in [entry.load() for entry in entry_points(group="vllm.general_plugins")]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"press": "full", "budget": 8}, "FullKV compresses nothing"),
        ({"press": "lookm", "budget": 8}, "merges evicted KV"),
        ({"press": "mixkv", "budget": 8}, "redundancy table"),
        ({"press": "vlcache", "budget": 8}, "image-token positions"),
        ({"press": "h2o", "budget": 8}, "unknown or unsupported press 'h2o'"),
        ({"press": "shiftkv", "budget": 0}, "budget must be an int >= 1"),
        ({"press": "shiftkv", "budget": 8, "press_kwargs": {"allocator": None}}, "uniform absolute budgets"),
        ({"press": "shiftkv", "budget": 8, "press_kwargs": {"tau": 2.0}}, "cannot build 'shiftkv'"),
        ({"press": "shiftkv"}, "needs budget"),
        ({"press": "shiftkv", "budget": 8, "ratio": 0.5}, "unknown keys ratio"),
        ({"press": "shiftkv", "budget": 8, "record_blocks": 1}, "record_blocks must be a bool"),
        ({"press": "shiftkv", "budget": 8, "record_limit": 0}, "record_limit must be an int >= 1"),
    ],
)
def test_bad_press_configuration_is_refused(section, message):
    class Config:
        additional_config = {"mmshiftkv": section}

    with pytest.raises(EngineConfigError, match=message):
        VLLMPressConfig.from_vllm_config(Config())


def test_every_registered_press_is_served_or_refused_with_its_reason():
    from mmshiftkv.registry import PRESSES
    from mmshiftkv.vllm.config import UNSERVED_PRESSES, VLLM_PRESSES

    assert set(VLLM_PRESSES) | set(UNSERVED_PRESSES) == set(PRESSES)
    assert not set(VLLM_PRESSES) & set(UNSERVED_PRESSES)


def test_a_press_that_cannot_score_chunks_is_refused(monkeypatch):
    """vLLM may split any prompt over steps (chunked prefill, or an image past the encoder budget), so a
    press that cannot score chunks is refused when the engine is configured."""
    from mmshiftkv.presses import SnapKVPress

    monkeypatch.setattr(SnapKVPress, "chunked_prefill_refusal", "it reads the whole attention matrix")

    class Config:
        additional_config = {"mmshiftkv": {"press": "snapkv", "budget": 8}}

    message = "'snapkv' cannot score a prompt prefilled in chunks: it reads the whole attention matrix"
    with pytest.raises(EngineConfigError, match=message):
        VLLMPressConfig.from_vllm_config(Config())


def test_engine_without_section_has_no_press():
    class Config:
        additional_config = {}

    assert VLLMPressConfig.from_vllm_config(Config()) is None


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"enable_prefix_caching": True}, "enable_prefix_caching=False"),
        ({"enforce_eager": False}, "enforce_eager=True"),
    ],
)
def test_engine_settings_that_break_compaction_are_refused(model_dirs, setting, message):
    # Refused when the engine config is created, before any worker starts.
    with pytest.raises(EngineConfigError, match=message), engine(model_dirs("qwen2"), "snapkv", **setting):
        pass


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=1"),
        ({"tensor_parallel_size": 4}, r"tensor_parallel_size <= 2"),
        ({"tensor_parallel_size": 4, "decode_context_parallel_size": 2}, "decode_context_parallel_size=1"),
    ],
)
def test_parallelism_that_breaks_compaction_is_refused(model_dirs, setting, message):
    with pytest.raises(EngineConfigError, match=message), engine(model_dirs("qwen2"), "snapkv", **setting):
        pass


def test_breakable_cuda_graphs_are_refused(model_dirs, monkeypatch):
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")
    with (
        pytest.raises(EngineConfigError, match="VLLM_USE_BREAKABLE_CUDAGRAPH=0"),
        engine(model_dirs("qwen2"), "snapkv"),
    ):
        pass


@pytest.fixture(scope="module")
def engine_config(model_dirs):
    """A real engine config the checks accept (no press section: nothing is checked while it is built)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=model_dirs("qwen2"),
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        max_model_len=512,
        max_num_batched_tokens=512,
    ).create_engine_config()


def test_checks_accept_an_eager_unchunked_engine(engine_config):
    check_engine_config(engine_config)


def test_cuda_graphs_are_refused(engine_config, monkeypatch):
    # The CPU platform turns CUDA graphs off itself, so the setting is made after the config is built.
    from vllm.config import CUDAGraphMode

    monkeypatch.setattr(engine_config.compilation_config, "cudagraph_mode", CUDAGraphMode.FULL_AND_PIECEWISE)
    message = r"cudagraph_mode is FULL_AND_PIECEWISE.*'cudagraph_mode': 'NONE'"
    with pytest.raises(EngineConfigError, match=message):
        check_engine_config(engine_config)


def test_v2_model_runner_is_refused_naming_the_switch(engine_config, monkeypatch):
    # vLLM's CPU build cannot select the V2 runner here (it needs Triton's CPU backend); on GPUs it is
    # vLLM 0.32's default.
    monkeypatch.setattr(type(engine_config), "use_v2_model_runner", property(lambda self: True))
    with pytest.raises(EngineConfigError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        check_engine_config(engine_config)
