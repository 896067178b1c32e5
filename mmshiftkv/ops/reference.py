"""Pure-torch ShiftKV scoring: the oracle the compiled op must equal.

Written for clarity, step by step as in the paper (Eq. 9-10) and the authors' released code.

Precision
---------
Everything that decides a vote is computed in float64: the logits (inputs are float16, bfloat16 or
float32, so their products are exact in float64), the softmax, the head mean, the group masses and
the coverage sums. The compiled op computes logits and masses in float32 (float64 only for the sums
that decide a vote); how far its votes may differ from these is stated in
:func:`mmshiftkv.ops.shiftkv_scores` and :mod:`mmshiftkv.ops.precision`. Ties between equal masses
go to the lower token index. torch's kernels may round the same value differently depending on its
position (a BLAS picks kernels by shape and CPU), so the reference itself only guarantees equal
masses for equal keys where the logits are exact (e.g. small-integer inputs).

The coverage rule is evaluated on the *uncovered* (tail) mass: "the first k tokens cover tau of
the mass" is tested as ``tail_k <= (1 - tau) * total``, which equals Eq. 9 in exact arithmetic and
makes ``tau = 1`` vote exactly the tokens with non-zero mass (a prefix sum can absorb tiny masses
and reach the total early; a tail sum of positive masses never reaches zero).
"""

from __future__ import annotations

import torch

from mmshiftkv.ops.checks import check_anchor_weight, check_scoring_inputs, check_vote_parameters


def _attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None,
    exclude_last_key: bool,
) -> torch.Tensor:
    """Softmax attention of float64 queries over float64 keys.

    Parameters
    ----------
    queries : torch.Tensor
        ``(batch, kv_heads, rows, head_dim)`` float64.
    keys : torch.Tensor
        ``(batch, kv_heads, seq_len, head_dim)`` float64.

    Returns
    -------
    torch.Tensor
        ``(batch, kv_heads, rows, seq_len)`` float64 probabilities.
    """
    logits = torch.matmul(queries, keys.transpose(-1, -2)) * scaling
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    # A sample whose keys are all padding has no finite logit: shift by 0 so its row is all zeros.
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(logits - shift)
    # A row with a real key sums to >= 1 (its max contributes exp(0) = 1); an empty row sums to 0.
    probs = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1.0)
    if exclude_last_key:
        probs[..., -1] = 0.0
    return probs


def group_attention_mass(
    proxies: torch.Tensor,
    keys: torch.Tensor,
    last_query: torch.Tensor,
    *,
    n_groups: int,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    anchor_in_groups: bool = False,
    exclude_last_key: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group attention mass of the query proxies, and the last query's attention.

    Streams over groups: besides the returned ``O(n_groups * seq_len)`` masses per KV head it holds
    a float64 copy of the keys and one group's attention block ``(batch, q_heads, g, seq_len)``.

    Parameters
    ----------
    proxies : torch.Tensor
        ``(batch, q_heads, n_proxies, head_dim)`` RoPE'd query proxies; group ``j`` is the consecutive
        proxies ``[j * g, (j + 1) * g)`` with ``g = n_proxies // n_groups``.
    keys : torch.Tensor
        ``(batch, kv_heads, seq_len, head_dim)`` prompt keys as stored in the KV cache. KV head ``h``
        serves query heads ``[h * r, (h + 1) * r)``, ``r = q_heads // kv_heads``.
    last_query : torch.Tensor
        ``(batch, q_heads, head_dim)`` RoPE'd query of the last prompt token.
    n_groups : int
        Number of proxy groups ``G``.
    scaling : float
        Logit scale, usually ``head_dim ** -0.5``.
    key_mask : torch.Tensor, optional
        ``(batch, seq_len)`` bool, True for real tokens (False = left padding).
    anchor_in_groups : bool
        Return ``(mass + anchor) / (g + 1)`` as each group's mass (the authors' released code).
    exclude_last_key : bool
        Zero the last key's attention after the softmax, without renormalising.

    Returns
    -------
    mass : torch.Tensor
        ``(batch, kv_heads, n_groups, seq_len)`` float64: the sum over a group's proxies of their
        attention averaged over the query heads of the KV head.
    anchor : torch.Tensor
        ``(batch, kv_heads, seq_len)`` float64: the last query's attention averaged over those heads.
    """
    check_scoring_inputs(proxies, keys, last_query, key_mask, n_groups, scaling)
    batch, q_heads, n_proxies, head_dim = proxies.shape
    kv_heads, seq_len = keys.shape[1], keys.shape[2]
    heads_per_kv = q_heads // kv_heads
    group_size = n_proxies // n_groups

    keys64 = keys.double()
    mask = None if key_mask is None else key_mask.bool()

    def attention(queries: torch.Tensor) -> torch.Tensor:
        return _attention(queries, keys64, scaling, mask, exclude_last_key)

    anchor_queries = last_query.double().view(batch, kv_heads, heads_per_kv, head_dim)
    anchor = attention(anchor_queries).mean(dim=2)

    grouped = proxies.view(batch, kv_heads, heads_per_kv, n_groups, group_size, head_dim)
    masses = []
    for j in range(n_groups):
        block = grouped[:, :, :, j].reshape(batch, kv_heads, heads_per_kv * group_size, head_dim)
        probs = attention(block.double()).view(batch, kv_heads, heads_per_kv, group_size, seq_len)
        masses.append(probs.mean(dim=2).sum(dim=2))
    mass = torch.stack(masses, dim=2)
    if anchor_in_groups:
        mass = (mass + anchor[:, :, None, :]) / (group_size + 1)
    return mass, anchor


def votes_from_mass(mass: torch.Tensor, tau: float, coverage: str = "smallest") -> torch.Tensor:
    """Which tokens each row's tau-coverage set votes for.

    Tokens are ordered by mass, descending, ties towards the lower index. With ``tail_k`` the mass
    left outside the first ``k`` tokens and ``budget = (1 - tau) * total``:

    * ``coverage="smallest"`` (paper Eq. 9): the first ``k*`` tokens, ``k*`` the smallest ``k >= 1``
      with ``tail_k <= budget`` (the smallest set covering tau of the mass);
    * ``coverage="within"`` (authors' code, ``searchsorted(cumsum, tau * total, right=True)``): the
      first ``k*`` tokens, ``k*`` the number of ``k`` with ``tail_k >= budget`` (the largest prefix
      whose mass stays within tau; possibly empty).

    Tokens with zero mass (padding, an excluded last key) never get a vote; a row of zeros votes
    for nothing.

    Parameters
    ----------
    mass : torch.Tensor
        ``(..., seq_len)`` non-negative masses, compared in float64.
    tau : float
        Coverage fraction in (0, 1].
    coverage : str
        ``"smallest"`` or ``"within"``.

    Returns
    -------
    torch.Tensor
        ``(..., seq_len)`` bool, True where the row votes for the token.
    """
    check_vote_parameters(tau, coverage)
    mass = mass.double()
    seq_len = mass.shape[-1]
    values, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    # suffix[i] = values[i] + ... + values[-1], summed from the smallest masses up.
    suffix = values.flip(-1).cumsum(dim=-1).flip(-1)
    tail = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)
    total = suffix[..., :1]
    budget = (1.0 - tau) * total
    # smallest: the first k with tail_k <= budget; within: every k with tail_k >= budget.
    smallest = coverage == "smallest"
    n_voted = 1 + (tail > budget).sum(dim=-1) if smallest else (tail >= budget).sum(dim=-1)
    n_voted = torch.minimum(n_voted, (mass > 0).sum(dim=-1))
    voted_in_order = torch.arange(seq_len, device=mass.device) < n_voted[..., None]
    return torch.zeros_like(voted_in_order).scatter(-1, order, voted_in_order)


def shiftkv_scores_reference(
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
) -> torch.Tensor:
    """ShiftKV score: group votes plus the weighted last-query attention.

    Parameters are those of :func:`group_attention_mass` and :func:`votes_from_mass`, plus
    ``anchor_weight`` (lambda, the weight of the last-query attention).

    Returns
    -------
    torch.Tensor
        ``(batch, kv_heads, seq_len)`` float32 ``votes + anchor_weight * anchor``; padding keys get
        ``-inf``.
    """
    check_vote_parameters(tau, coverage)
    check_anchor_weight(anchor_weight)
    mass, anchor = group_attention_mass(
        proxies,
        keys,
        last_query,
        n_groups=n_groups,
        scaling=scaling,
        key_mask=key_mask,
        anchor_in_groups=anchor_in_groups,
        exclude_last_key=exclude_last_key,
    )
    votes = votes_from_mass(mass, tau, coverage).sum(dim=2)
    scores = (votes.double() + anchor_weight * anchor).float()
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :].bool(), float("-inf"))
    return scores
