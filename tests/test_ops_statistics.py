"""ShiftKV's prompt statistics (mmshiftkv.ops.prompt_moments) against a float64 recomputation.

Both paths (the compiled CPU pass and the chunked torch pass) must give the mean and unbiased
variance within float32 rounding, also when the prompt's first tokens sit far from the rest (the
shift both use), and the compiled pass must not depend on the thread count.
"""

from __future__ import annotations

import pytest
import torch

from mmshiftkv.ops import available, prompt_moments, statistics

PATHS = ["compiled", "torch"] if available()["cpu"] else ["torch"]


def _states(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, cols, generator=generator) * torch.linspace(0.5, 2.0, cols) + 3.0
    states[: rows // 7] += 50.0  # a far-off first chunk: a shifted system prompt
    return states.to(dtype)


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch":
        monkeypatch.setattr(statistics, "runs_on", lambda device: False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (1, 40), (5, 7), (300, 33), (3000, 48), (700, 3584)])
@pytest.mark.parametrize("per_feature", [False, True])
def test_moments_match_a_float64_recomputation(
    path: str, dtype: torch.dtype, rows: int, cols: int, per_feature: bool
) -> None:
    states = _states(rows, cols, dtype)
    mean, variance = prompt_moments(states, per_feature=per_feature)
    values = states.double() if per_feature else states.double().reshape(-1, 1)
    expected_mean = values.mean(0)
    expected_variance = values.var(0) if values.shape[0] > 1 else torch.zeros_like(expected_mean)
    width = cols if per_feature else 1
    assert mean.dtype == variance.dtype == torch.float32 and mean.shape == variance.shape == (width,)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(variance.double(), expected_variance, rtol=2e-5, atol=1e-6)


def test_compiled_moments_do_not_depend_on_the_thread_count() -> None:
    if not available()["cpu"]:
        pytest.skip("the compiled op is not built")
    states = _states(5000, 300, torch.bfloat16, seed=4)
    threads = torch.get_num_threads()
    results = [prompt_moments(states, per_feature=flag) for flag in (False, True)]
    torch.set_num_threads(1)
    try:
        single = [prompt_moments(states, per_feature=flag) for flag in (False, True)]
    finally:
        torch.set_num_threads(threads)
    for (mean, variance), (mean_1, variance_1) in zip(results, single):
        assert torch.equal(mean, mean_1) and torch.equal(variance, variance_1)


def test_bad_states_are_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        prompt_moments(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="matrix"):
        prompt_moments(torch.zeros(3, 4, 5))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        prompt_moments(torch.zeros(3, 4, dtype=torch.float64))
