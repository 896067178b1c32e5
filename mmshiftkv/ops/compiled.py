"""Loading of the compiled extension ``mmshiftkv._C`` and the call into ``torch.ops.mmshiftkv``."""

from __future__ import annotations

import importlib

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `make build`) from the repository root"
)


def _load() -> tuple[object | None, str | None]:
    try:
        module = importlib.import_module("mmshiftkv._C")
    except (ImportError, OSError) as error:  # not built, or built against another torch
        return None, f"{type(error).__name__}: {error}"
    return module, None


_EXTENSION, LOAD_ERROR = _load()


if _EXTENSION is not None:

    @torch.library.register_fake("mmshiftkv::shiftkv_scores")
    def _shiftkv_scores_fake(
        proxies: torch.Tensor,
        keys: torch.Tensor,
        last_query: torch.Tensor,
        key_mask: torch.Tensor | None,
        n_groups: int,
        tau: float,
        scaling: float,
        anchor_weight: float,
        anchor_in_groups: bool,
        coverage: str,
        exclude_last_key: bool,
    ) -> torch.Tensor:
        # Output shape for tracing (torch.compile, meta tensors): (batch, kv_heads, seq_len) float32.
        return keys.new_empty(keys.shape[:3], dtype=torch.float32)


def available() -> dict[str, bool]:
    """Where the compiled op can run.

    Returns
    -------
    dict
        ``{"cpu": bool, "cuda": bool}``: ``cpu`` is True when the extension is built and imports;
        ``cuda`` when, in addition, it was built with its CUDA kernel and a GPU is visible.
        The torch reference backend runs everywhere.
    """
    built = _EXTENSION is not None
    with_cuda = built and bool(getattr(_EXTENSION, "WITH_CUDA", 0))
    return {"cpu": built, "cuda": with_cuda and torch.cuda.is_available()}


def runs_on(device: torch.device) -> bool:
    """Whether the compiled op has a kernel for tensors on ``device``."""
    return available().get(device.type, False)


def shiftkv_scores_compiled(
    proxies: torch.Tensor,
    keys: torch.Tensor,
    last_query: torch.Tensor,
    *,
    n_groups: int,
    tau: float,
    scaling: float,
    anchor_weight: float,
    key_mask: torch.Tensor | None,
    anchor_in_groups: bool,
    coverage: str,
    exclude_last_key: bool,
) -> torch.Tensor:
    """Call ``torch.ops.mmshiftkv.shiftkv_scores`` (see :func:`mmshiftkv.ops.shiftkv_scores`)."""
    if not runs_on(proxies.device):
        reason = LOAD_ERROR or f"the extension was built without a kernel for {proxies.device.type}"
        raise RuntimeError(
            f"the compiled ShiftKV op is unavailable on {proxies.device} ({reason}); {BUILD_HINT}"
        )
    return torch.ops.mmshiftkv.shiftkv_scores(
        proxies.detach(),
        keys.detach(),
        last_query.detach(),
        key_mask,
        n_groups,
        float(tau),
        float(scaling),
        float(anchor_weight),
        anchor_in_groups,
        coverage,
        exclude_last_key,
    )
