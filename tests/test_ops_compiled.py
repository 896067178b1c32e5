"""The compiled ShiftKV op (torch.ops.mmshiftkv.shiftkv_scores) against the float64 reference.

The op computes logits with a float32-accumulating GEMM (its own CPU kernel for the machine's ATen
CPU capability, bfloat16 dot products where the CPU has them; cuBLAS on CUDA) and its softmax and
masses in float32, so its masses sit within the stated margin
(:func:`mmshiftkv.ops.precision.mass_margin`) of the reference's. Nothing here depends on how a GEMM
rounds: a vote may differ only where the reference's masses are within that margin of a tie or of
the tau boundary (found on the reference's masses), by at most one per group concerned; exact ties
are tested on inputs whose logits every GEMM computes exactly (small integers, a power-of-two
scale), against hand-computed vote tables. Every CPU kernel the machine can run (DEFAULT, AVX2,
AVX-512) is checked, each in a process of its own under ``ATEN_CPU_CAPABILITY``.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mmshiftkv.ops import available, group_attention_mass, shiftkv_scores, votes_from_mass
from mmshiftkv.ops.compiled import BUILD_HINT, LOAD_ERROR, cpu_kernel, logit_max
from mmshiftkv.ops.precision import (
    SMALLEST_NORMAL,
    UNIT_ROUNDOFF,
    ZERO_FLOOR,
    logit_error,
    mass_margin,
    uncertain_votes,
)
from mmshiftkv.presses.selection import select_kept_indices

pytestmark = pytest.mark.skipif(
    not available()["cpu"], reason=f"mmshiftkv._C is not built ({LOAD_ERROR}); {BUILD_HINT}"
)

DEVICES = ["cpu"] + (["cuda"] if available()["cuda"] else [])


@dataclass
class Case:
    proxies: torch.Tensor
    keys: torch.Tensor
    last_query: torch.Tensor
    key_mask: torch.Tensor | None
    options: dict

    def to(self, target: str | torch.dtype) -> Case:
        """The case on another device, or with its proxies, keys and last query in another dtype."""
        mask = self.key_mask
        if mask is not None and not isinstance(target, torch.dtype):
            mask = mask.to(target)
        tensors = (self.proxies.to(target), self.keys.to(target), self.last_query.to(target))
        return Case(*tensors, mask, self.options)


def _random_case(rng: random.Random, seq_len: int, adversarial: bool) -> Case:
    """A random scoring call; ``adversarial`` adds duplicate keys and near one-hot attention."""
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    head_dim = rng.choice([64, 80, 128])
    kv_heads = rng.choice([1, 2])
    heads_per_kv = rng.randint(1, 8)
    n_groups, group_size = rng.choice([(1, 1), (1, 4), (2, 4), (4, 4), (8, 2), (16, 4), (32, 2)])
    if seq_len > 1000:  # keep the float64 reference fast
        n_groups, group_size = rng.choice([(1, 4), (4, 2), (8, 4)])
    batch = rng.choice([1, 2])
    q_heads = kv_heads * heads_per_kv
    n_proxies = n_groups * group_size
    # Proxy spread: plain queries and the paper's 10x expanded ones (+ near one-hot attention).
    spread = rng.choice([1.0, 10.0, 300.0] if adversarial else [1.0, 10.0])
    proxies = torch.randn(batch, q_heads, n_proxies, head_dim, generator=generator) * spread
    keys = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator)
    last_query = torch.randn(batch, q_heads, head_dim, generator=generator) * spread
    if adversarial and seq_len > 1 and rng.random() < 0.5:  # duplicate keys: ties in the reference
        n_copies = rng.randint(1, seq_len)
        source = torch.randint(0, seq_len, (n_copies,), generator=generator)
        target = torch.randint(0, seq_len, (n_copies,), generator=generator)
        keys[:, :, target] = keys[:, :, source]
    key_mask = None
    if rng.random() < 0.5:  # left padding, the last token always real
        n_pad = torch.randint(0, seq_len, (batch,), generator=generator)
        key_mask = torch.arange(seq_len)[None, :] >= n_pad[:, None]
    options = {
        "n_groups": n_groups,
        "tau": rng.choice([1.0, 1e-6, rng.uniform(0.05, 0.999), rng.uniform(0.9, 0.99)]),
        "scaling": head_dim**-0.5,
        "anchor_weight": rng.choice([1.0, 0.0, 2.5]),
        "anchor_in_groups": rng.random() < 0.5,
        "coverage": rng.choice(["smallest", "within"]),
        "exclude_last_key": rng.random() < 0.5,
    }
    return Case(proxies.to(dtype), keys.to(dtype), last_query.to(dtype), key_mask, options)


@dataclass
class Comparison:
    tokens: int  # real (batch, KV head, token) triples
    differing_tokens: int  # of which the op's vote count differs from the reference's
    uncertain_heads: int  # KV heads holding a vote the margin allows to differ
    kept_checked: int  # (KV head, budget) pairs whose kept sets had to be identical


def _compare(case: Case, device: str, scores: torch.Tensor | None = None) -> Comparison:
    """Assert the op's scores (computed here unless given) follow the reference within the margin."""
    case = case.to(device)
    options = case.options
    args = (case.proxies, case.keys, case.last_query)
    if scores is None:
        scores = shiftkv_scores(*args, key_mask=case.key_mask, backend="compiled", **options)
    scores = scores.to(device)
    mass, anchor = group_attention_mass(
        *args,
        n_groups=options["n_groups"],
        scaling=options["scaling"],
        key_mask=case.key_mask,
        anchor_in_groups=options["anchor_in_groups"],
        exclude_last_key=options["exclude_last_key"],
    )
    margin = mass_margin(*args, n_groups=options["n_groups"], scaling=options["scaling"])
    votes = votes_from_mass(mass, options["tau"], options["coverage"]).sum(dim=2).double()
    anchor_term = options["anchor_weight"] * anchor
    allowed = uncertain_votes(mass.cpu(), options["tau"], options["coverage"], margin).to(device)

    real = torch.ones_like(votes, dtype=torch.bool)
    if case.key_mask is not None:
        real = case.key_mask[:, None, :].expand_as(votes)
        assert bool((scores[~real] == float("-inf")).all())
    difference = (torch.round(scores.double() - anchor_term) - votes).abs().masked_fill(~real, 0.0)
    assert bool((difference <= allowed).all()), f"votes differ beyond the margin {margin:.2e}: {options}"
    expected = votes + anchor_term
    # The anchor term within the margin, plus the float32 rounding of the score (down to subnormals).
    anchor_tolerance = (margin * anchor_term.abs() + ZERO_FLOOR) * 1.0001
    tolerance = anchor_tolerance + expected.abs() * 2**-23 + 2**-149
    checked = real & (difference == 0)
    assert bool(((scores.double() - expected).abs()[checked] <= tolerance[checked]).all())

    # Kept sets: identical on every KV head without uncertain votes, unless the reference's scores
    # tie within the anchor tolerance at the budget's boundary.
    reference = expected.float().masked_fill(~real, float("-inf"))
    seq_len = case.keys.shape[2]
    kept_checked = 0
    for budget in sorted({1, 2, max(seq_len // 3, 1), seq_len}):
        kept_op = select_kept_indices(scores, budget, case.key_mask)[0]
        kept_ref = select_kept_indices(reference, budget, case.key_mask)[0]
        # Only the last token is kept for free; the others compete on score.
        ranked = (
            expected[..., :-1].masked_fill(~real[..., :-1], -math.inf).sort(dim=-1, descending=True).values
        )
        for b, h in ((b, h) for b in range(scores.shape[0]) for h in range(scores.shape[1])):
            if bool(allowed[b, h].any()):
                continue
            if 1 < budget <= seq_len - 1:
                gap = ranked[b, h, budget - 2] - ranked[b, h, budget - 1]
                if gap <= 2 * float(tolerance[b, h].max()):
                    continue
            assert torch.equal(kept_op[b, h], kept_ref[b, h]), (budget, b, h, options)
            kept_checked += 1
    return Comparison(
        tokens=int(real.sum()),
        differing_tokens=int(((difference > 0) & real).sum()),
        uncertain_heads=int((allowed > 0).any(dim=-1).sum()),
        kept_checked=kept_checked,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_random_sweep_agrees_on_999_per_mille_of_tokens(device: str) -> None:
    rng = random.Random(20240607)
    lengths = [1, 2, 3, 5, 8, 16, 31, 64, 100, 257, 600, 1100] * 4 + [2000, 5000]
    totals = Comparison(0, 0, 0, 0)
    for seq_len in lengths:
        result = _compare(_random_case(rng, seq_len, adversarial=False), device)
        totals = Comparison(*(a + b for a, b in zip(vars(totals).values(), vars(result).values())))
    assert totals.differing_tokens <= totals.tokens // 1000, totals
    assert totals.kept_checked >= 100, totals


@pytest.mark.parametrize("device", DEVICES)
def test_adversarial_sweep_differs_only_within_the_margin(device: str) -> None:
    # Duplicate keys (exact ties in the reference, broken by GEMM rounding in the op) and near
    # one-hot attention (float32 underflow): votes may differ, but only where the margin allows.
    rng = random.Random(7)
    totals = Comparison(0, 0, 0, 0)
    for seq_len in [1, 2, 5, 16, 64, 257, 600] * 4:
        result = _compare(_random_case(rng, seq_len, adversarial=True), device)
        totals = Comparison(*(a + b for a, b in zip(vars(totals).values(), vars(result).values())))
    assert totals.kept_checked >= 50, totals


# Exact ties by construction: small-integer proxies and keys and a power-of-two scale make every
# logit exactly representable, so any GEMM (any BLAS, tensor cores, TF32) computes it exactly, and
# equal keys get bit-equal masses in the op. seq_len 307 and these tau values keep tau * 307 away
# from an integer, so the coverage boundary is not a near-tie.
TIE_SEQ_LEN = 307
TIE_TAUS = [0.4, 0.9, 1.0]


def _integer_case(keys_pattern: torch.Tensor, dtype: torch.dtype, seed: int = 7) -> Case:
    generator = torch.Generator().manual_seed(seed)
    batch, kv_heads, r, n_proxies, dim = 2, 2, 4, 16, 64
    proxies = torch.randint(-2, 3, (batch, kv_heads * r, n_proxies, dim), generator=generator).float()
    last = torch.randint(-2, 3, (batch, kv_heads * r, dim), generator=generator).float()
    distinct = torch.randint(-2, 3, (batch, kv_heads, int(keys_pattern.max()) + 1, dim), generator=generator)
    keys = distinct[:, :, keys_pattern].float()
    options = {"n_groups": 4, "scaling": 0.125, "anchor_weight": 0.0}
    return Case(proxies.to(dtype), keys.to(dtype), last.to(dtype), None, options)


def _hand_votes(case: Case, pattern: torch.Tensor, tau: float, coverage: str) -> torch.Tensor:
    """Vote counts from the definition, masses computed per distinct key with math.exp.

    Every key that repeats a distinct key has exactly its mass, so ties are exact here by
    construction and go to the lower token index.
    """
    proxies, keys, last = (t.double() for t in (case.proxies, case.keys, case.last_query))
    # Exact logits leave the op only its float32 exp/normalisation/sum error, (r * g + 16) * 2**-24
    # (2e-6 here): no distinct masses nor tails within 50 times that may decide a vote.
    slack = 1e-4
    batch, q_heads, n_proxies, _ = proxies.shape
    kv_heads, n_groups = keys.shape[1], case.options["n_groups"]
    r, g = q_heads // kv_heads, n_proxies // n_groups
    counts = torch.bincount(pattern).tolist()
    first_index = {int(k): int((pattern == k).nonzero()[0]) for k in pattern.unique()}
    votes = torch.zeros(batch, kv_heads, len(pattern))
    for b in range(batch):
        for h in range(kv_heads):
            distinct = keys[b, h, [first_index[k] for k in range(len(counts))]]
            for j in range(n_groups):
                mass = [0.0] * len(counts)
                for head in range(h * r, (h + 1) * r):
                    for n in range(j * g, (j + 1) * g):
                        logits = [float(proxies[b, head, n] @ key) * 0.125 for key in distinct]
                        top = max(logits)
                        weights = [math.exp(x - top) for x in logits]
                        total = sum(w * c for w, c in zip(weights, counts))
                        for k, w in enumerate(weights):
                            mass[k] += w / total / r
                distinct_sorted = sorted(mass)
                # A valid tie case: distinct keys' masses are far apart, well beyond the op's margin.
                assert all(b > a * (1 + slack) for a, b in zip(distinct_sorted, distinct_sorted[1:]))
                order = sorted(range(len(pattern)), key=lambda t: (-mass[int(pattern[t])], t))
                token_mass = [mass[int(pattern[t])] for t in order]
                budget = (1 - tau) * sum(token_mass)
                tails = [sum(token_mass[k + 1 :]) for k in range(len(order))]
                # ... and no coverage boundary is near the budget (tau = 1: the budget is exactly 0).
                assert all(abs(tail - budget) > slack * budget for tail in tails if tau < 1)
                if coverage == "smallest":
                    n_voted = next(k + 1 for k, tail in enumerate(tails) if tail <= budget)
                else:
                    n_voted = sum(tail >= budget for tail in tails)
                for t in order[:n_voted]:
                    votes[b, h, t] += 1
    return votes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("coverage", ["smallest", "within"])
@pytest.mark.parametrize("tau", TIE_TAUS)
def test_identical_keys_vote_in_index_order(
    device: str, dtype: torch.dtype, coverage: str, tau: float
) -> None:
    case = _integer_case(torch.zeros(TIE_SEQ_LEN, dtype=torch.long), dtype).to(device)
    scores = shiftkv_scores(
        case.proxies,
        case.keys,
        case.last_query,
        tau=tau,
        coverage=coverage,
        backend="compiled",
        **case.options,
    )
    # Every mass ties: the first ceil(tau * T) ("smallest") or floor(tau * T) ("within") tokens.
    n_voted = math.ceil(tau * TIE_SEQ_LEN) if coverage == "smallest" else math.floor(tau * TIE_SEQ_LEN)
    expected = torch.zeros(TIE_SEQ_LEN)
    expected[:n_voted] = case.options["n_groups"]
    assert torch.equal(scores.cpu(), expected.expand_as(scores))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coverage", ["smallest", "within"])
@pytest.mark.parametrize("tau", TIE_TAUS)
def test_tie_blocks_of_repeated_keys_follow_the_hand_table(device: str, coverage: str, tau: float) -> None:
    pattern = torch.arange(TIE_SEQ_LEN) % 5  # 5 distinct keys repeated: large tie blocks
    case = _integer_case(pattern, torch.float32).to(device)
    scores = shiftkv_scores(
        case.proxies,
        case.keys,
        case.last_query,
        tau=tau,
        coverage=coverage,
        backend="compiled",
        **case.options,
    )
    assert torch.equal(scores.cpu(), _hand_votes(case.to("cpu"), pattern, tau, coverage))


def test_margin_is_what_the_docstring_states() -> None:
    # head_dim 4, one KV head serving 2 query heads, 6 proxies in 2 groups: r * g = 6.
    proxies = torch.zeros(1, 2, 6, 4)
    proxies[0, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5, largest element 4
    keys = torch.zeros(1, 1, 3, 4)
    keys[0, 0, 1] = torch.tensor([0.0, 0.0, 2.0, 0.0])  # norm 2, largest element 2
    last = torch.zeros(1, 2, 4)
    error = 0.5 * (2 * (4 + 2) * 2**-24 * 5.0 * 2.0 + 4 * 2**-126 * (1 + 4.0 + 2.0))
    assert logit_error(torch.cat([proxies[0, 0], last[0]]), keys, scaling=0.5) == error
    expected = math.expm1(2 * error) + (6 + 16) * 2**-24
    assert mass_margin(proxies, keys, last, n_groups=2, scaling=0.5) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_of_exact_logits_within_the_float32_share_of_the_margin(dtype: torch.dtype) -> None:
    # One query row, one proxy (r * g = 1) and logits from 0 to -100 that any GEMM computes exactly
    # (key = 8 x e_1, query e_1, scale 1/8): the anchor term is then the op's float32 exp,
    # normalisation and mass alone, each token's within (1 + 16) * 2^-24 of exp's, or under ZERO_FLOOR.
    keys = torch.zeros(1, 1, 801, 64, dtype=dtype)
    keys[0, 0, :, 0] = -torch.arange(801.0)  # bfloat16 rounds the larger ones: still exact products
    query = torch.zeros(1, 1, 64, dtype=dtype)
    query[0, 0, 0] = 1.0
    proxies = query[:, :, None].clone()
    options = {"n_groups": 1, "tau": 1e-6, "scaling": 0.125, "anchor_weight": 1.0}
    scores = shiftkv_scores(proxies, keys, query, backend="compiled", **options)
    probabilities = torch.softmax(keys[0, 0, :, 0].double() / 8, dim=0)
    anchor = scores[0, 0].double() - (torch.arange(801) == 0).double()  # token 0 takes the one vote
    bound = (1 + 16) * UNIT_ROUNDOFF * probabilities + ZERO_FLOOR + 2**-24 * scores[0, 0].double()
    assert bool(((anchor - probabilities).abs() <= bound).all())


def test_all_padding_sample_and_single_token() -> None:
    generator = torch.Generator().manual_seed(3)
    proxies = torch.randn(2, 2, 4, 64, generator=generator)
    keys = torch.randn(2, 1, 1, 64, generator=generator)
    last = torch.randn(2, 2, 64, generator=generator)
    key_mask = torch.tensor([[True], [False]])
    options = {"n_groups": 2, "tau": 0.95, "scaling": 0.125, "key_mask": key_mask}
    op = shiftkv_scores(proxies, keys, last, backend="compiled", **options)
    # One real key takes all the attention: every group votes for it, the anchor is 1.
    assert op[0].tolist() == [[2.0 + 1.0]]
    assert op[1].tolist() == [[float("-inf")]]


def test_deterministic_and_thread_count_independent() -> None:
    case = _random_case(random.Random(5), 700, adversarial=False)
    case.options["n_groups"] = 8
    case.proxies = torch.randn(1, 14, 512, 128).to(case.proxies.dtype)  # several GEMM blocks per head
    case.keys = torch.randn(1, 2, 700, 128).to(case.keys.dtype)
    case.last_query = torch.randn(1, 14, 128).to(case.last_query.dtype)
    case.key_mask = None
    args = (case.proxies, case.keys, case.last_query)
    first = shiftkv_scores(*args, backend="compiled", **case.options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = shiftkv_scores(*args, backend="compiled", **case.options)
    finally:
        torch.set_num_threads(threads)
    again = shiftkv_scores(*args, backend="compiled", **case.options)
    assert torch.equal(first, single) and torch.equal(first, again)


# ---------------------------------------------------------------------------------------------
# The CPU kernels: one per ATen CPU capability, the bfloat16 logits GEMM where the CPU has it.

CAPABILITY_KERNELS = {"DEFAULT": "default", "AVX2": "avx2", "AVX512": "avx512"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = next((line.split(":")[1] for line in text.splitlines() if line.startswith("flags")), "")
    return set(flags.split())


def test_cpu_kernel_follows_the_aten_capability() -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    expected = CAPABILITY_KERNELS.get(capability, "default")
    assert cpu_kernel(torch.float32) == cpu_kernel(torch.float16) == expected
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo: cannot tell whether the CPU has AVX512-BF16")
    assert cpu_kernel(torch.bfloat16) == expected + _bf16_suffix(expected, flags)


def _bf16_suffix(kernel: str, flags: set[str]) -> str:
    """The bfloat16 GEMM the AVX-512 kernel is expected to pick: AMX tiles (ATen's oneDNN brgemm, while
    oneDNN is enabled and its ISA is not capped), else AVX512-BF16 dot products, else float32."""
    if kernel != "avx512":
        return ""
    tiles = {"amx_tile", "amx_bf16"} <= flags and "ONEDNN_MAX_CPU_ISA" not in os.environ
    if tiles and torch.backends.mkldnn.enabled:
        return "_amx_bf16"
    return "_bf16" if "avx512_bf16" in flags else ""


def test_bfloat16_gemm_falls_back_while_onednn_is_disabled() -> None:
    # AMX tiles run through oneDNN: with it disabled the op must pick another GEMM, not fail.
    capability = torch.backends.cpu.get_cpu_capability()
    expected = CAPABILITY_KERNELS.get(capability, "default")
    generator = torch.Generator().manual_seed(5)
    queries = (torch.randn(40, 128, generator=generator) * 10).bfloat16()
    keys = torch.randn(300, 128, generator=generator).bfloat16()
    reference = (queries.double() @ keys.double().T * 0.125).amax(dim=-1)
    bound = logit_error(queries, keys, scaling=0.125)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not cpu_kernel(torch.bfloat16).endswith("_amx_bf16")
        if expected == "avx512" and "avx512_bf16" in _cpu_flags():
            assert cpu_kernel(torch.bfloat16) == "avx512_bf16"
        maxima = logit_max(queries, keys, 0.125)
    assert float((maxima.double() - reference).abs().max()) <= bound
    assert float((logit_max(queries, keys, 0.125).double() - reference).abs().max()) <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_gemm_within_its_stated_error(dtype: torch.dtype) -> None:
    # Row counts and key counts off the kernel's tiles and panels, an odd head_dim (bfloat16 pairs),
    # large norms, and subnormal bfloat16 elements (flushed to zero by its dot products).
    generator = torch.Generator().manual_seed(17)
    for n_rows, seq_len, head_dim in [(1, 1, 1), (7, 63, 80), (13, 65, 127), (200, 1000, 128)]:
        queries = torch.randn(n_rows, head_dim, generator=generator) * 30.0
        keys = torch.randn(seq_len, head_dim, generator=generator)
        if dtype == torch.bfloat16:
            keys[:, :3] = 1e-39  # subnormal in bfloat16
        queries, keys = queries.to(dtype), keys.to(dtype)
        scaling = head_dim**-0.5
        maxima = logit_max(queries, keys, scaling)
        reference = (queries.double() @ keys.double().T * scaling).amax(dim=-1)
        bound = logit_error(queries, keys, scaling=scaling)
        assert maxima.dtype == torch.float32 and maxima.shape == (n_rows,)
        assert float((maxima.double() - reference).abs().max()) <= bound, (n_rows, seq_len, head_dim)


def test_logits_gemm_error_bound_is_tight_enough_to_mean_something() -> None:
    # The stated bound is a worst case; the kernel's actual error on random data sits well inside
    # it but is not zero (it is a float32 GEMM, not a float64 one).
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(60, 128, generator=generator) * 10
    keys = torch.randn(3000, 128, generator=generator)
    reference = (queries.double() @ keys.double().T).amax(-1)
    error = float((logit_max(queries, keys, 1.0).double() - reference).abs().max())
    assert 0 < error <= logit_error(queries, keys, scaling=1.0)
    assert logit_error(queries, keys, scaling=1.0) < 1e3 * UNIT_ROUNDOFF * 10 * 128 + SMALLEST_NORMAL * 1e3


def test_seven_b_shapes_in_bfloat16_follow_the_reference() -> None:
    # Qwen2.5-VL-7B's head layout (28 query heads on 4 KV heads, head_dim 128), the paper's 10x proxy
    # spread: on a CPU with AVX512-BF16 this runs the bfloat16 logits GEMM.
    generator = torch.Generator().manual_seed(28)
    proxies = (torch.randn(1, 28, 64, 128, generator=generator) * 10).bfloat16()
    keys = torch.randn(1, 4, 1500, 128, generator=generator).bfloat16()
    last = torch.randn(1, 28, 128, generator=generator).bfloat16()
    options = {"n_groups": 4, "tau": 0.95, "scaling": 128**-0.5, "anchor_weight": 1.0}
    options |= {"anchor_in_groups": False, "coverage": "smallest", "exclude_last_key": False}
    result = _compare(Case(proxies, keys, last, None, options), "cpu")
    assert result.differing_tokens <= result.tokens // 1000


def _capabilities_to_check() -> list[str]:
    """The ATen CPU capabilities this machine runs, up to the current one (DEFAULT < AVX2 < AVX512)."""
    order = list(CAPABILITY_KERNELS)
    current = torch.backends.cpu.get_cpu_capability()
    return order[: order.index(current) + 1] if current in order else [current]


_SCORE_CASES = """
import json, sys, torch
from mmshiftkv.ops import shiftkv_scores
from mmshiftkv.ops.compiled import cpu_kernel
cases = torch.load(sys.argv[1])
scores = [
    shiftkv_scores(*case["args"], key_mask=case["key_mask"], backend="compiled", **case["options"])
    for case in cases
]
torch.save(scores, sys.argv[2])
print(json.dumps({d: cpu_kernel(getattr(torch, d)) for d in ("float32", "bfloat16", "float16")}))
"""


def test_every_cpu_capability_runs_its_kernel_and_follows_the_reference(tmp_path: Path) -> None:
    rng = random.Random(99)
    dtypes = {5: torch.float32, 100: torch.bfloat16, 257: torch.float16, 700: torch.bfloat16}
    cases = [_random_case(rng, seq_len, adversarial=False).to(dtype) for seq_len, dtype in dtypes.items()]
    payload = [
        {"args": (c.proxies, c.keys, c.last_query), "key_mask": c.key_mask, "options": c.options}
        for c in cases
    ]
    torch.save(payload, tmp_path / "cases.pt")
    command = [sys.executable, "-c", _SCORE_CASES, str(tmp_path / "cases.pt"), str(tmp_path / "scores.pt")]
    for capability in _capabilities_to_check():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        kernels = json.loads(done.stdout.strip().splitlines()[-1])
        assert kernels["float32"] == kernels["float16"] == CAPABILITY_KERNELS.get(capability, "default")
        for case, scores in zip(cases, torch.load(tmp_path / "scores.pt")):
            _compare(case, "cpu", scores)


def _valid_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(1, 4, 8, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 4, 16)


def _call_op(proxies, keys, last, key_mask=None, n_groups=2, tau=0.9, scaling=0.25, coverage="smallest"):
    return torch.ops.mmshiftkv.shiftkv_scores(
        proxies, keys, last, key_mask, n_groups, tau, scaling, 1.0, False, coverage, False
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"proxies": torch.randn(1, 4, 8, 8)}, "head_dim"),
        ({"keys": torch.randn(1, 3, 10, 16)}, "multiple of kv_heads"),
        ({"last": torch.randn(1, 3, 16)}, "last_query"),
        ({"proxies": torch.randn(4, 8, 16)}, "proxies must be"),
        ({"n_groups": 3}, "divisible"),
        ({"n_groups": 0}, "n_groups"),
        ({"keys": torch.randn(1, 2, 0, 16)}, "empty"),
        (
            {
                "proxies": torch.randn(1, 4, 8, 16).double(),
                "keys": torch.randn(1, 2, 10, 16).double(),
                "last": torch.randn(1, 4, 16).double(),
            },
            "float16, bfloat16 or float32",
        ),
        ({"keys": torch.randn(1, 2, 10, 16).half()}, "one dtype"),
        ({"key_mask": torch.ones(1, 10)}, "bool"),
        ({"key_mask": torch.ones(1, 9, dtype=torch.bool)}, "key_mask"),
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"scaling": float("nan")}, "scaling"),
        ({"coverage": "largest"}, "coverage"),
    ],
)
def test_bad_input_raises_from_the_op(change: dict, message: str) -> None:
    proxies, keys, last = _valid_inputs()
    arguments = {"proxies": proxies, "keys": keys, "last": last} | change
    with pytest.raises(RuntimeError, match=message):
        _call_op(**arguments)


def test_bad_input_raises_from_the_python_face() -> None:
    proxies, keys, last = _valid_inputs()
    with pytest.raises(ValueError, match="divisible"):
        shiftkv_scores(proxies, keys, last, n_groups=3, tau=0.9, scaling=0.25, backend="compiled")
    with pytest.raises(ValueError, match="one device"):
        shiftkv_scores(proxies, keys.to("meta"), last, n_groups=2, tau=0.9, scaling=0.25, backend="compiled")
    with pytest.raises(TypeError, match="one dtype"):
        shiftkv_scores(proxies, keys.half(), last, n_groups=2, tau=0.9, scaling=0.25, backend="compiled")


def test_meta_tensors_give_the_output_shape_for_tracing() -> None:
    proxies, keys, last = (t.to("meta") for t in _valid_inputs())
    scores = _call_op(proxies, keys, last)
    assert scores.shape == (1, 2, 10) and scores.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_non_contiguous_inputs(dtype: torch.dtype, offset: int) -> None:
    # The CPU op reads query rows in place where it can (contiguous elements; bfloat16: 4-byte aligned
    # pairs) and copies the others: views with strided rows, an odd or even element offset, or
    # transposed, score as their contiguous copies.
    generator = torch.Generator().manual_seed(11)
    wide = torch.randn(2, 6, 16, 84, generator=generator).to(dtype)[..., offset : offset + 80]  # 84 apart
    transposed = torch.randn(2, 16, 6, 80, generator=generator).to(dtype).transpose(1, 2)  # (2, 6, 16, 80)
    keys = torch.randn(2, 3, 180, 80, generator=generator).to(dtype)[:, :, ::2]  # (2, 3, 90, 80)
    last = torch.randn(2, 84, 6, generator=generator).to(dtype).transpose(1, 2)[..., offset : offset + 80]
    options = {"n_groups": 4, "tau": 0.8, "scaling": 80**-0.5, "anchor_in_groups": True}
    for proxies in (wide, transposed):
        assert not any(t.is_contiguous() for t in (proxies, keys, last))
        op = shiftkv_scores(proxies, keys, last, backend="compiled", **options)
        contiguous = (t.contiguous() for t in (proxies, keys, last))
        assert torch.equal(op, shiftkv_scores(*contiguous, backend="compiled", **options))
    rows = wide[0, 0]
    assert torch.equal(logit_max(rows, keys[0, 0], 0.125), logit_max(rows.contiguous(), keys[0, 0], 0.125))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "poison",
    ["nan_key", "inf_key", "nan_padded_key", "nan_last_query", "nan_proxy"],
)
def test_non_finite_inputs_give_the_references_nan_heads(device: str, poison: str) -> None:
    """A NaN or inf real key or last query makes its head's scores NaN in the float64 reference (so a
    press refuses it); the op gives the same heads NaN, padded keys and proxies stay harmless."""
    generator = torch.Generator().manual_seed(7)
    batch, kv_heads, group, n_proxies, seq_len, head_dim = 2, 2, 2, 64, 24, 16
    proxies = torch.randn(batch, kv_heads * group, n_proxies, head_dim, generator=generator)
    keys = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator)
    last_query = torch.randn(batch, kv_heads * group, head_dim, generator=generator)
    key_mask = torch.ones(batch, seq_len, dtype=torch.bool)
    key_mask[1, :3] = False
    if poison == "nan_key":
        keys[0, 1, 5, 2] = float("nan")
    elif poison == "inf_key":
        keys[1, 0, 9, 0] = float("inf")
    elif poison == "nan_padded_key":
        keys[1, 1, 1] = float("nan")
    elif poison == "nan_last_query":
        last_query[0, 1] = float("nan")  # query head 1 reads KV head 0
    else:
        proxies[1, 3, 10] = float("nan")
    args = (proxies.to(device), keys.to(device), last_query.to(device))
    options = dict(n_groups=8, tau=0.95, scaling=0.25, key_mask=key_mask.to(device))
    reference = shiftkv_scores(*args, **options, backend="torch")
    compiled = shiftkv_scores(*args, **options, backend="compiled")
    assert torch.equal(compiled.isnan().any(-1).cpu(), reference.isnan().any(-1).cpu())
    assert bool(reference.isnan().any()) == (poison in ("nan_key", "inf_key", "nan_last_query"))
