"""The plugin refuses engine settings and press configurations it cannot serve correctly, saying why."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from mmshiftkv.vllm import (  # noqa: E402
    EngineConfigError,
    VLLMPressConfig,
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
        ({"press": "full", "budget": 8}, "unsupported press"),
        ({"press": "shiftkv", "budget": 0}, "budget must be an int >= 1"),
        ({"press": "shiftkv", "budget": 8, "press_kwargs": {"allocator": None}}, "uniform absolute budgets"),
        ({"press": "shiftkv", "budget": 8, "press_kwargs": {"tau": 2.0}}, "cannot build 'shiftkv'"),
        ({"press": "shiftkv"}, "needs budget"),
        ({"press": "shiftkv", "budget": 8, "ratio": 0.5}, "unknown keys ratio"),
    ],
)
def test_bad_press_configuration_is_refused(section, message):
    class Config:
        additional_config = {"mmshiftkv": section}

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
        ({"enable_chunked_prefill": True}, "enable_chunked_prefill=False"),
        ({"enforce_eager": False}, "enforce_eager=True"),
    ],
)
def test_engine_settings_that_break_compaction_are_refused(model_dirs, setting, message):
    # Refused when the engine config is created, before any worker starts.
    with pytest.raises(EngineConfigError, match=message), engine(model_dirs("qwen2"), "snapkv", **setting):
        pass
