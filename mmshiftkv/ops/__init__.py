"""ShiftKV scoring: the compiled op (``torch.ops.mmshiftkv.shiftkv_scores``) and its torch reference.

:func:`shiftkv_scores` is the entry point; :func:`available` tells where the compiled op runs;
:func:`prompt_moments` gives the prompt statistics the proxies are drawn from;
:func:`weight_products` multiplies a weight by a few vectors in one read of it, the same bits at every call.
The reference's building blocks (:func:`group_attention_mass`, :func:`votes_from_mass`) are exported
for ablations such as ranking by summed mass instead of votes.
"""

from __future__ import annotations

import warnings

import torch

from mmshiftkv.ops.checks import check_anchor_weight, check_scoring_inputs, check_vote_parameters
from mmshiftkv.ops.compiled import BUILD_HINT, LOAD_ERROR, available, runs_on, shiftkv_scores_compiled
from mmshiftkv.ops.projection import weight_products
from mmshiftkv.ops.reference import group_attention_mass, shiftkv_scores_reference, votes_from_mass
from mmshiftkv.ops.statistics import prompt_moments

__all__ = [
    "BACKENDS",
    "available",
    "group_attention_mass",
    "prompt_moments",
    "shiftkv_scores",
    "shiftkv_scores_reference",
    "votes_from_mass",
    "weight_products",
]

BACKENDS = ("auto", "compiled", "torch")

_fallback_warned = False


def _warn_fallback_once(device: torch.device) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    reason = LOAD_ERROR or f"the extension has no kernel for {device.type}"
    warnings.warn(
        f"mmshiftkv: the compiled ShiftKV op is unavailable on {device} ({reason}); using the slower torch "
        f"reference. To get the compiled op, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )


def shiftkv_scores(
    proxies: torch.Tensor,
    keys: torch.Tensor,
    last_query: torch.Tensor,
    *,
    n_groups: int,
    tau: float,
    scaling: float,
    anchor_weight: float = 1.0,
    key_mask: torch.Tensor | None = None,
    anchor_in_groups: bool = False,
    coverage: str = "smallest",
    exclude_last_key: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token ShiftKV importance: group votes plus the weighted last-query attention.

    For each KV head, the softmax attention of every query proxy and of the last prompt query over
    the prompt keys is averaged over the query heads the KV head serves; proxies form ``n_groups``
    groups of consecutive proxies; each group sums its proxies' attention per key and votes for the
    keys of its tau-coverage set (see :func:`votes_from_mass` for ``coverage``, ties towards the
    lower token index); the score is ``votes + anchor_weight * anchor``.

    Numerics
    --------
    The torch backend computes everything in float64. The compiled op computes the logits by
    matrix multiplication with float32 accumulation, over blocks of query rows so extra memory
    stays O(n_groups * seq_len) per KV head: on the CPU its own GEMM kernels (float32 FMAs; for
    bfloat16 inputs on CPUs with AVX512-BF16, bfloat16 dot products accumulating in float32, and on
    CPUs with AMX, AMX tiles through ATen's oneDNN brgemm, see
    :func:`mmshiftkv.ops.compiled.cpu_kernel`), compiled per ATen CPU capability and picked from
    ``torch.backends.cpu.get_cpu_capability()``; on CUDA cuBLAS through ATen (float16/bfloat16
    inputs on tensor cores with float32 output, float32 inputs in float32 unless TF32 is enabled
    for matmuls). The softmax and the group masses are float32, and the sums that decide a vote (a
    group's total and tail masses) float64. Its masses are within ``delta = mass_margin(...)``
    (relative, :mod:`mmshiftkv.ops.precision`: ``expm1(2 * logit_error)``, the logit error about
    ``2 * (head_dim + 2) * 2**-24 * scaling * max|q| * max|k|``, plus ``(r * g + 16) * 2**-24``) plus
    ``2**-100`` (absolute, float32 underflow) of the float64 reference's. Hence:

    * where the reference's masses are within that margin of a tie at a group's coverage boundary
      (the last voted against the first unvoted token) or of the tau boundary (a tail mass against
      ``(1 - tau) * total``), the op may choose the other side, by one vote per such group;
    * elsewhere its votes are identical; masses the op computes equal (e.g. equal keys whose logits
      are exact) go to the lower token index, as in the reference;
    * the anchor term is within ``delta`` (relative) of the reference's.

    Over the random sweep of ``tests/test_ops_compiled.py`` (float32/bfloat16/float16,
    head_dim 64-128, GQA 1-8, up to 5000 keys) at most 1 in 1000 tokens get a different vote count.

    Parameters
    ----------
    proxies : torch.Tensor
        ``(batch, q_heads, n_proxies, head_dim)`` RoPE'd query proxies.
    keys : torch.Tensor
        ``(batch, kv_heads, seq_len, head_dim)`` prompt keys as stored in the KV cache; KV head ``h``
        serves query heads ``[h * r, (h + 1) * r)``, ``r = q_heads // kv_heads``.
    last_query : torch.Tensor
        ``(batch, q_heads, head_dim)`` RoPE'd query of the last prompt token.
    n_groups : int
        Number of proxy groups ``G``; must divide ``n_proxies``.
    tau : float
        Coverage fraction in (0, 1].
    scaling : float
        Logit scale, usually ``head_dim ** -0.5``.
    anchor_weight : float
        Weight lambda of the last-query attention.
    key_mask : torch.Tensor, optional
        ``(batch, seq_len)`` bool, True for real tokens (False = left padding). Padding keys get no
        attention, no vote and a score of ``-inf``.
    anchor_in_groups : bool
        Vote on ``(group mass + anchor) / (g + 1)`` (the authors' released code).
    coverage : str
        ``"smallest"`` (paper Eq. 9) or ``"within"`` (authors' code).
    exclude_last_key : bool
        Zero the last key's attention after the softmax, without renormalising (authors' code).
    backend : str
        ``"compiled"`` (the extension; error if unavailable), ``"torch"`` (the reference) or
        ``"auto"`` (compiled when available for the inputs' device, else the reference with a
        one-time warning).

    Returns
    -------
    torch.Tensor
        ``(batch, kv_heads, seq_len)`` float32 scores.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_scoring_inputs(proxies, keys, last_query, key_mask, n_groups, scaling)
    check_vote_parameters(tau, coverage)
    check_anchor_weight(anchor_weight)
    options = {
        "n_groups": n_groups,
        "tau": tau,
        "scaling": scaling,
        "anchor_weight": anchor_weight,
        "key_mask": key_mask,
        "anchor_in_groups": anchor_in_groups,
        "coverage": coverage,
        "exclude_last_key": exclude_last_key,
    }
    if backend == "auto":
        if runs_on(proxies.device):
            backend = "compiled"
        else:
            _warn_fallback_once(proxies.device)
            backend = "torch"
    if backend == "compiled":
        return shiftkv_scores_compiled(proxies, keys, last_query, **options)
    with torch.no_grad():
        return shiftkv_scores_reference(proxies, keys, last_query, **options)
