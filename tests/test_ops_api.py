"""The Python face of the ShiftKV op: backend choice, fallback warning, validation."""

from __future__ import annotations

import warnings

import pytest
import torch

import mmshiftkv.ops as ops
from mmshiftkv.ops import compiled


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 4, 8, 16, generator=generator),
        torch.randn(1, 2, 12, 16, generator=generator),
        torch.randn(1, 4, 16, generator=generator),
    )


OPTIONS = {"n_groups": 2, "tau": 0.9, "scaling": 0.25}


def test_available_reports_each_device() -> None:
    report = ops.available()
    assert set(report) == {"cpu", "cuda"} and all(isinstance(v, bool) for v in report.values())
    if report["cuda"]:
        assert report["cpu"]


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "runs_on", lambda device: False)
    monkeypatch.setattr(ops, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation -e ."):
        scores = ops.shiftkv_scores(*_inputs(), **OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.shiftkv_scores(*_inputs(), **OPTIONS)
    assert torch.equal(scores, ops.shiftkv_scores(*_inputs(), backend="torch", **OPTIONS))


def test_compiled_backend_without_extension_names_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "runs_on", lambda device: False)
    with pytest.raises(RuntimeError, match="make build"):
        ops.shiftkv_scores(*_inputs(), backend="compiled", **OPTIONS)


def test_unknown_backend_and_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="backend"):
        ops.shiftkv_scores(*_inputs(), backend="triton", **OPTIONS)
    with pytest.raises(ValueError, match="tau"):
        ops.shiftkv_scores(*_inputs(), n_groups=2, tau=1.2, scaling=0.25)
    with pytest.raises(ValueError, match="coverage"):
        ops.shiftkv_scores(*_inputs(), coverage="largest", **OPTIONS)
    with pytest.raises(ValueError, match="anchor_weight"):
        ops.shiftkv_scores(*_inputs(), anchor_weight=float("inf"), **OPTIONS)
    with pytest.raises(ValueError, match="scaling"):
        ops.shiftkv_scores(*_inputs(), n_groups=2, tau=0.9, scaling=0.0)
    proxies, keys, last = _inputs()
    with pytest.raises(ValueError, match="empty"):
        ops.shiftkv_scores(proxies, keys[:, :, :0], last, **OPTIONS)
    with pytest.raises(TypeError, match="bool"):
        ops.shiftkv_scores(proxies, keys, last, key_mask=torch.ones(1, 12), **OPTIONS)
