"""ShiftKV's per-layer projections outside the scoring op, each in one pass over its data.

:func:`weight_products`: each layer's ``q_proj`` weight is read once per prefill for two products:
with a fixed random probe (the fingerprint that notices a changed weight, which must come out bit for
bit the same while the weight is unchanged) and with the last prompt token's attention input (its
query). :func:`rotate_half_compiled`: the RoPE of float32 queries in one pass;
:func:`affine_rotate_half_compiled`: ShiftKV's 512 proxies per query head built from ``(W 1, W z)``,
rotated and rounded in one pass.
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


def affine_rotate_half_compiled(
    base: torch.Tensor,
    offset: torch.Tensor,
    scale: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Half-style RoPE of the query heads of ``offset + scale * base`` in ``dtype``; None where it cannot run.

    One pass of the compiled op over ``base``: each feature is one float32 multiply-add, the rotation
    as :func:`rotate_half_compiled`, then one rounding to ``dtype``; the float32 products are never
    stored (ShiftKV's proxies, ``mean * W 1 + b + gamma * std * W z``, are 512 rows per layer).

    Parameters
    ----------
    base : torch.Tensor
        ``(n, heads * head_dim)`` float16, bfloat16 or float32 (``W z``).
    offset : torch.Tensor
        ``(batch, heads * head_dim)`` float32, added to every row.
    scale : torch.Tensor
        ``(batch,)`` float32 factor of ``base``.
    cos, sin : torch.Tensor
        ``(batch or 1, period, rotary_dim)`` float32, ``period`` dividing ``n``: row ``i`` is rotated by
        table row ``i % period`` (even ``rotary_dim <= head_dim``; features past it are not rotated).
    heads : int
        Query heads; ``head_dim = base.shape[1] // heads``.
    dtype : torch.dtype
        float16, bfloat16 or float32: the result's.

    Returns
    -------
    torch.Tensor or None
        ``(batch, heads, n, head_dim)`` contiguous; None off the CPU, without the extension, for other
        dtypes or shapes, or where autograd would need the inputs.
    """
    width = base.shape[-1] if base.dim() == 2 else 0
    fits = (
        base.device.type == "cpu"
        and base.dim() == 2
        and base.dtype in SCORING_DTYPES
        and dtype in SCORING_DTYPES
        and heads > 0
        and width % heads == 0
        and offset.dtype == scale.dtype == cos.dtype == sin.dtype == torch.float32
        and offset.dim() == 2
        and offset.shape[1] == width
        and scale.shape == offset.shape[:1]
        and cos.shape == sin.shape
        and cos.dim() == 3
        and cos.shape[0] in (1, offset.shape[0])
        and cos.shape[1] > 0
        and base.shape[0] % cos.shape[1] == 0
        and cos.shape[2] % 2 == 0
        and cos.shape[2] <= width // heads
        and not any(t.requires_grad for t in (base, offset, scale, cos, sin))
    )
    if not fits or not runs_on(base.device):
        return None
    return torch.ops.mmshiftkv.affine_rotate_half(base, offset, scale, cos, sin, heads, dtype)
