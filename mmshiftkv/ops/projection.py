"""Products of a weight with a few vectors in one read of the weight, the same bits at every call.

ShiftKV reads each layer's ``q_proj`` weight once per prefill for two products: with a fixed random
probe (the fingerprint that notices a changed weight, which must come out bit for bit the same while
the weight is unchanged) and with the last prompt token's attention input (its query).
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
