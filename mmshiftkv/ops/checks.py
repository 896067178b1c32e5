"""Input validation shared by the torch reference and the compiled op's Python face."""

from __future__ import annotations

import math

import torch

COVERAGES = ("smallest", "within")
SCORING_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_scoring_inputs(
    proxies: torch.Tensor,
    keys: torch.Tensor,
    last_query: torch.Tensor,
    key_mask: torch.Tensor | None,
    n_groups: int,
    scaling: float,
) -> None:
    """Raise TypeError/ValueError unless the tensors form one valid ShiftKV scoring call.

    Parameters
    ----------
    proxies : torch.Tensor
        ``(batch, q_heads, n_proxies, head_dim)``.
    keys : torch.Tensor
        ``(batch, kv_heads, seq_len, head_dim)``.
    last_query : torch.Tensor
        ``(batch, q_heads, head_dim)``.
    key_mask : torch.Tensor, optional
        ``(batch, seq_len)`` bool.
    n_groups : int
        Number of proxy groups; must divide ``n_proxies``.
    scaling : float
        Logit scale; finite and positive.
    """
    named = {"proxies": proxies, "keys": keys, "last_query": last_query}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SCORING_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")
    if len({t.dtype for t in named.values()}) != 1:
        dtypes = ", ".join(f"{name}={t.dtype}" for name, t in named.items())
        raise TypeError(f"proxies, keys and last_query must share one dtype, got {dtypes}")
    if len({t.device for t in named.values()}) != 1:
        devices = ", ".join(f"{name}={t.device}" for name, t in named.items())
        raise ValueError(f"proxies, keys and last_query must be on one device, got {devices}")
    for name, dim in (("proxies", 4), ("keys", 4), ("last_query", 3)):
        if named[name].dim() != dim:
            raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(named[name].shape)}")

    batch, q_heads, n_proxies, head_dim = proxies.shape
    k_batch, kv_heads, seq_len, k_dim = keys.shape
    if (k_batch, k_dim) != (batch, head_dim):
        raise ValueError(
            f"keys {tuple(keys.shape)} do not match proxies {tuple(proxies.shape)} in batch or head_dim"
        )
    if tuple(last_query.shape) != (batch, q_heads, head_dim):
        raise ValueError(
            f"last_query must be (batch, q_heads, head_dim) = {(batch, q_heads, head_dim)}, "
            f"got {tuple(last_query.shape)}"
        )
    if min(batch, q_heads, n_proxies, head_dim, kv_heads) == 0:
        raise ValueError(f"empty input: proxies {tuple(proxies.shape)}, keys {tuple(keys.shape)}")
    if seq_len == 0:
        raise ValueError("keys are empty (seq_len == 0): there is nothing to score")
    if q_heads % kv_heads != 0:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be a positive int, got {n_groups!r}")
    if n_proxies % n_groups != 0:
        raise ValueError(f"n_proxies ({n_proxies}) must be divisible by n_groups ({n_groups})")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be finite and positive, got {scaling}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor, got {getattr(key_mask, 'dtype', key_mask)}")
        if tuple(key_mask.shape) != (batch, seq_len):
            raise ValueError(
                f"key_mask must be (batch, seq_len) = {(batch, seq_len)}, got {tuple(key_mask.shape)}"
            )
        if key_mask.device != keys.device:
            raise ValueError(f"key_mask is on {key_mask.device} but keys are on {keys.device}")


def check_vote_parameters(tau: float, coverage: str) -> None:
    """Raise ValueError unless ``tau`` is in (0, 1] and ``coverage`` is a known rule."""
    if not (isinstance(tau, (int, float)) and 0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    if coverage not in COVERAGES:
        raise ValueError(f"coverage must be one of {COVERAGES}, got {coverage!r}")


def check_anchor_weight(anchor_weight: float) -> None:
    """Raise ValueError unless ``anchor_weight`` is a finite number."""
    if not (isinstance(anchor_weight, (int, float)) and math.isfinite(anchor_weight)):
        raise ValueError(f"anchor_weight must be a finite number, got {anchor_weight!r}")
