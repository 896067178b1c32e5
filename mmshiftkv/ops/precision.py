"""How far the compiled op's masses may sit from the float64 reference's: the stated vote margin.

The compiled op computes logits with a float32-accumulating GEMM, the softmax and the group masses in
float32, and only the sums that decide a vote in float64 (see :func:`mmshiftkv.ops.shiftkv_scores`).
The logits GEMM is, per device and input dtype:

* CPU, float32 inputs: the op's float32 GEMM (a chain of float32 FMAs per logit);
* CPU, float16 inputs, and bfloat16 inputs where the CPU has no native bfloat16 dot product: the
  same float32 GEMM on the inputs converted to float32 (exactly);
* CPU, bfloat16 inputs on a CPU with AVX512-BF16 (:func:`mmshiftkv.ops.compiled.cpu_kernel` says
  ``"avx512_bf16"``): bfloat16 dot products (VDPBF16PS) accumulating in float32;
* CPU, bfloat16 inputs on a CPU with AMX (``"avx512_amx_bf16"``, while oneDNN is enabled): AMX tiles
  (TDPBF16PS, through ATen's oneDNN brgemm) accumulating in float32, which like VDPBF16PS flush
  subnormal inputs;
* CUDA: cuBLAS with float32 accumulation (tensor cores for float16/bfloat16 inputs).

A float16 or bfloat16 product is exact in float32, so the bfloat16 GEMM costs nothing in exactness
over the float32 GEMM of the same inputs except that VDPBF16PS, AMX tiles and tensor cores flush subnormal
inputs and results to zero: at most ``head_dim * 2**-126 * (1 + max|q_i| + max|k_i|)`` per dot
product, far below any mass that can decide a vote, and stated as an absolute term of
:func:`logit_error`. The masses therefore carry the rounding of

* a float32 dot product of length ``head_dim`` (``(head_dim + 2) * u * |q| * |k|`` at most,
  doubled here for GPU tensor cores and AMX tiles, whose float32 adders may truncate), the scaling, and the
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

from mmshiftkv.ops.reference import votes_from_mass

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


def uncertain_votes(mass: torch.Tensor, tau: float, coverage: str, margin: float) -> torch.Tensor:
    """How many of its groups' votes for a token the op may cast differently from the reference.

    Each op mass is within ``margin`` (relative) plus :data:`ZERO_FLOOR` of the reference's, so is
    every tail sum, and the budget ``(1 - tau) * total``. Where a tail and the budget are that close,
    the voted count may move by one; masses that close to each other may come out in either order,
    which matters at the boundary between the last voted and the first unvoted token. Tokens whose
    mass is that close to such a critical value are uncertain for that group.

    Parameters
    ----------
    mass : torch.Tensor
        ``(batch, kv_heads, n_groups, seq_len)`` the reference's float64 group masses
        (:func:`mmshiftkv.ops.group_attention_mass`), on the CPU.
    tau : float
        Coverage of the vote.
    coverage : str
        ``"smallest"`` or ``"within"`` (:func:`mmshiftkv.ops.votes_from_mass`).
    margin : float
        Relative mass margin (:func:`mass_margin`).

    Returns
    -------
    torch.Tensor
        ``(batch, kv_heads, seq_len)`` int64: per token, the number of groups whose vote may differ.
    """
    seq_len = mass.shape[-1]
    values = torch.sort(mass, dim=-1, descending=True, stable=True).values
    suffix = values.flip(-1).cumsum(dim=-1).flip(-1)
    tail = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)
    budget = (1.0 - tau) * suffix[..., :1]
    slack = margin * (tail + budget) + 2 * seq_len * ZERO_FLOOR
    near_threshold = ((tail - budget).abs() <= slack) & (suffix[..., :1] > 0)
    critical = near_threshold | torch.nn.functional.pad(near_threshold[..., :-1], (1, 0))

    def close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs() <= margin * (a + b) + 2 * ZERO_FLOOR

    n_voted = votes_from_mass(mass, tau, coverage).sum(dim=-1, keepdim=True)
    for position in (n_voted - 1, n_voted):  # the last voted and the first unvoted token
        inside = (position >= 0) & (position < seq_len) & (n_voted > 0) & (n_voted < seq_len)
        value = values.gather(-1, position.clamp(0, seq_len - 1))
        near_tie = (close(mass, value) & (mass != value)).any(dim=-1, keepdim=True)
        critical |= (torch.arange(seq_len) == position) & inside & near_tie

    uncertain = torch.zeros_like(mass, dtype=torch.bool)
    for group in critical.any(dim=-1).nonzero().tolist():
        index = tuple(group)
        for value in values[index][critical[index]]:
            uncertain[index] |= close(mass[index], value)
    return uncertain.sum(dim=2)
