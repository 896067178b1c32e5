"""How far the compiled op's masses may sit from the float64 reference's: the stated vote margin.

The compiled op computes logits with a float32-accumulating GEMM, the softmax and the group masses in
float32, and only the sums that decide a vote in float64 (see :func:`mmshiftkv.ops.shiftkv_scores`).
The logits GEMM is, per device and input dtype:

* CPU, float32 inputs: the op's float32 GEMM (a chain of float32 FMAs per logit);
* CPU, float16 inputs, and bfloat16 inputs where the CPU has no native bfloat16 dot product: the
  same float32 GEMM on the inputs converted to float32 (exactly);
* CPU, bfloat16 inputs on a CPU with AVX512-BF16 (:func:`mmshiftkv.ops.compiled.cpu_kernel` says
  ``"avx512_bf16"``): bfloat16 dot products (VDPBF16PS) accumulating in float32;
* CUDA: cuBLAS with float32 accumulation (tensor cores for float16/bfloat16 inputs).

A float16 or bfloat16 product is exact in float32, so the bfloat16 GEMM costs nothing in exactness
over the float32 GEMM of the same inputs except that VDPBF16PS (and tensor cores) flush subnormal
inputs and results to zero: at most ``head_dim * 2**-126 * (1 + max|q_i| + max|k_i|)`` per dot
product, far below any mass that can decide a vote, and stated as an absolute term of
:func:`logit_error`. The masses therefore carry the rounding of

* a float32 dot product of length ``head_dim`` (``(head_dim + 2) * u * |q| * |k|`` at most,
  doubled here for GPU tensor cores, whose float32 adders may truncate), the scaling, and the
  subtraction of the row maximum, which move every probability by a factor within
  ``exp(+-2 * logit_error)``;
* a float32 exp (CPU: within ``3.4 u``), the row sum (CPU: float32 pairs, then float64),
  the normalisation and the sum over the ``r * g`` rows of a group: ``(r * g + 16) * u``;

with ``u = 2**-24``. Probabilities below float32's normal range flush to zero where float64 still
has them, so masses also carry an absolute error below :data:`ZERO_FLOOR`.
"""

from __future__ import annotations

import math

import torch

#: float32 unit roundoff.
UNIT_ROUNDOFF = 2.0**-24
#: Masses this small may come out as zero (float32 underflow) where the reference has them positive.
ZERO_FLOOR = 2.0**-100
#: Smallest normal float32: subnormal inputs and results of a bfloat16 dot product flush to zero.
SMALLEST_NORMAL = 2.0**-126


def logit_error(queries: torch.Tensor, keys: torch.Tensor, *, scaling: float) -> float:
    """Bound on ``|logit - logit_ref|`` for any query row and key (absolute, in logit units).

    Parameters
    ----------
    queries : torch.Tensor
        ``(..., head_dim)`` query rows (proxies and last queries).
    keys : torch.Tensor
        ``(..., head_dim)`` keys.
    scaling : float
        Logit scale.

    Returns
    -------
    float
        ``scaling * (2 (head_dim + 2) u max|q| max|k| + head_dim 2^-126 (1 + max|q_i| + max|k_i|))``
        with Euclidean norms ``|.|`` and largest elements ``|._i|``.
    """
    head_dim = queries.shape[-1]
    query_norm = float(queries.double().norm(dim=-1).max())
    key_norm = float(keys.double().norm(dim=-1).max())
    largest = float(queries.double().abs().max()) + float(keys.double().abs().max())
    rounding = 2 * (head_dim + 2) * UNIT_ROUNDOFF * query_norm * key_norm
    flushed = head_dim * SMALLEST_NORMAL * (1.0 + largest)
    return scaling * (rounding + flushed)


def mass_margin(
    proxies: torch.Tensor, keys: torch.Tensor, last_query: torch.Tensor, *, n_groups: int, scaling: float
) -> float:
    """Relative bound on the difference between the op's and the reference's vote masses.

    Parameters
    ----------
    proxies : torch.Tensor
        ``(batch, q_heads, n_proxies, head_dim)``.
    keys : torch.Tensor
        ``(batch, kv_heads, seq_len, head_dim)``.
    last_query : torch.Tensor
        ``(batch, q_heads, head_dim)``.
    n_groups : int
        Number of proxy groups.
    scaling : float
        Logit scale.

    Returns
    -------
    float
        ``delta`` such that every mass ``m`` of the op satisfies
        ``|m - m_ref| <= delta * m_ref + ZERO_FLOOR``: ``expm1(2 * logit_error) + (r g + 16) u``.
    """
    _, q_heads, n_proxies, _ = proxies.shape
    rows_per_group = q_heads // keys.shape[1] * (n_proxies // n_groups)
    queries = torch.cat([proxies.flatten(0, -2), last_query.flatten(0, -2)])
    error = logit_error(queries, keys, scaling=scaling)
    return math.expm1(2 * error) + (rows_per_group + 16) * UNIT_ROUNDOFF
