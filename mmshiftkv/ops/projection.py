"""ShiftKV's per-layer projections outside the scoring op, each in one pass over its data.

:func:`weight_products`: each layer's ``q_proj`` weight is read once per prefill for two products:
with a fixed random probe (the fingerprint that notices a changed weight, which must come out bit for
bit the same while the weight is unchanged) and with the last prompt token's attention input (its
query). :func:`rotate_half_compiled`: the RoPE of the 512 float32 proxies per query head.
"""

from __future__ import annotations

import torch

from mmshiftkv.ops.checks import SCORING_DTYPES
from mmshiftkv.ops.compiled import runs_on


def weight_products(weight: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``vectors @ weight.T`` in float32, each product summed in a fixed order.

    On the CPU with the compiled extension: one pass over the weight for all vectors, float32
    multiply-adds in an order that depends on ``in`` only (not on the other vectors, the thread
    count or memory alignment), so a product is the same bits at every call with the same weight
    and vector. Elsewhere: one ``torch.mv`` per vector (deterministic for fixed shapes on the CPU
    and in cuBLAS), in the weight's dtype, widened to float32.

    Parameters
    ----------
    weight : torch.Tensor
        ``(out, in)`` float16, bfloat16 or float32.
    vectors : torch.Tensor
        ``(n, in)`` floating point, on the weight's device.

    Returns
    -------
    torch.Tensor
        ``(n, out)`` float32.
    """
    if weight.dim() != 2 or vectors.dim() != 2 or weight.shape[1] != vectors.shape[1]:
        raise ValueError(
            f"weight (out, in) and vectors (n, in) must share in, got {tuple(weight.shape)} and "
            f"{tuple(vectors.shape)}"
        )
    if weight.dtype not in SCORING_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    if not vectors.is_floating_point():
        raise TypeError(f"vectors must be floating point, got {vectors.dtype}")
    if weight.device.type == "cpu" and runs_on(weight.device):
        return torch.ops.mmshiftkv.weight_products(weight.detach(), vectors.detach())
    vectors = vectors.detach().to(weight.dtype)
    return torch.stack([torch.mv(weight.detach(), vector) for vector in vectors]).float()


def rotate_half_compiled(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Half-style RoPE of float32 CPU states in one pass of the compiled op, or None where it does not run.

    ``states`` ``(batch, heads, n, head_dim)`` float32 with contiguous rows; ``cos``/``sin``
    ``(batch or 1, 1, n, rotary_dim)`` float32 (even ``rotary_dim <= head_dim``, features past it pass
    unchanged). Each rotated feature is two products and one sum, as in
    :func:`mmshiftkv.models.adapter.rotate`'s torch path. None for any other input (or without the
    extension): the caller rotates with torch then.
    """
    fits = (
        states.device.type == "cpu"
        and states.dtype == cos.dtype == sin.dtype == torch.float32
        and states.dim() == 4
        and states.stride(-1) == 1
        and cos.shape == sin.shape
        and cos.dim() == 4
        and cos.shape[0] in (1, states.shape[0])
        and cos.shape[1] == 1
        and cos.shape[2] == states.shape[2]
        and cos.shape[3] % 2 == 0
        and cos.shape[3] <= states.shape[3]
        and not (states.requires_grad or cos.requires_grad or sin.requires_grad)
    )
    if not fits or not runs_on(states.device):
        return None
    return torch.ops.mmshiftkv.rotate_half(states, cos, sin)
