"""How far the compiled op's masses may sit from the float64 reference's: the stated vote margin.

The compiled op computes logits with a float32-accumulating GEMM, the softmax and the group masses in
float32, and only the sums that decide a vote in float64 (see :func:`mmshiftkv.ops.shiftkv_scores`).
Its masses therefore carry the rounding of

* a float32 dot product of length ``head_dim`` (``(head_dim + 2) * u * |q| * |k|`` at most,
  doubled here for GPU tensor cores, whose float32 adders may truncate), which moves every
  probability by a factor within ``exp(+-2 * logit_error)``;
* a float32 exp, normalisation and the sum over the ``r * g`` rows of a group (``(r * g + 16) * u``);

with ``u = 2**-24``. Probabilities below float32's range flush to zero where float64 still has
them, so masses also carry an absolute error below :data:`ZERO_FLOOR`.
"""

from __future__ import annotations

import math

import torch

#: float32 unit roundoff.
UNIT_ROUNDOFF = 2.0**-24
#: Masses this small may come out as zero (float32 underflow) where the reference has them positive.
ZERO_FLOOR = 2.0**-100


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
        ``|m - m_ref| <= delta * m_ref + ZERO_FLOOR``.
    """
    _, q_heads, n_proxies, head_dim = proxies.shape
    rows_per_group = q_heads // keys.shape[1] * (n_proxies // n_groups)
    query_norm = max(
        float(proxies.double().norm(dim=-1).max()), float(last_query.double().norm(dim=-1).max())
    )
    key_norm = float(keys.double().norm(dim=-1).max())
    logit_error = 2 * (head_dim + 2) * UNIT_ROUNDOFF * scaling * query_norm * key_norm
    return math.expm1(2 * logit_error) + (rows_per_group + 16) * UNIT_ROUNDOFF
