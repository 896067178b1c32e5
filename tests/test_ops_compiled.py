"""The compiled ShiftKV op (torch.ops.mmshiftkv.shiftkv_scores) against the float64 reference.

The op computes logits with a float32-accumulating GEMM (whatever BLAS the machine has) and its
softmax and masses in float32, so its masses sit within the stated margin
(:func:`mmshiftkv.ops.precision.mass_margin`) of the reference's. Nothing here depends on how a BLAS
rounds: a vote may differ only where the reference's masses are within that margin of a tie or of
the tau boundary (found on the reference's masses), by at most one per group concerned; exact ties
are tested on inputs whose logits every GEMM computes exactly (small integers, a power-of-two
scale), against hand-computed vote tables.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from mmshiftkv.ops import available, group_attention_mass, shiftkv_scores, votes_from_mass
from mmshiftkv.ops.compiled import BUILD_HINT, LOAD_ERROR
from mmshiftkv.ops.precision import ZERO_FLOOR, mass_margin
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

    def to(self, device: str) -> Case:
        mask = None if self.key_mask is None else self.key_mask.to(device)
        return Case(
            self.proxies.to(device), self.keys.to(device), self.last_query.to(device), mask, self.options
        )


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


def _uncertain_votes(mass: torch.Tensor, tau: float, coverage: str, margin: float) -> torch.Tensor:
    """How many of its groups' votes for a token the op may cast differently: (batch, kv_heads, seq_len).

    Each op mass is within ``margin`` (relative) plus ZERO_FLOOR of the reference's, so is every tail
    sum, and the budget ``(1 - tau) * total``. Where a tail and the budget are that close, the voted
    count may move by one; masses that close to each other may come out in either order, which
    matters at the boundary between the last voted and the first unvoted token. Tokens whose mass
    is that close to such a critical value are uncertain for that group.
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


@dataclass
class Comparison:
    tokens: int  # real (batch, KV head, token) triples
    differing_tokens: int  # of which the op's vote count differs from the reference's
    uncertain_heads: int  # KV heads holding a vote the margin allows to differ
    kept_checked: int  # (KV head, budget) pairs whose kept sets had to be identical


def _compare(case: Case, device: str) -> Comparison:
    """Assert the op follows the reference on `device` within the stated margin."""
    case = case.to(device)
    options = case.options
    args = (case.proxies, case.keys, case.last_query)
    scores = shiftkv_scores(*args, key_mask=case.key_mask, backend="compiled", **options)
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
    allowed = _uncertain_votes(mass.cpu(), options["tau"], options["coverage"], margin).to(device)

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
    proxies[0, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    keys = torch.zeros(1, 1, 3, 4)
    keys[0, 0, 1] = torch.tensor([0.0, 0.0, 2.0, 0.0])  # norm 2
    last = torch.zeros(1, 2, 4)
    logit_error = 2 * (4 + 2) * 2**-24 * 0.5 * 5.0 * 2.0
    expected = math.expm1(2 * logit_error) + (6 + 16) * 2**-24
    assert mass_margin(proxies, keys, last, n_groups=2, scaling=0.5) == pytest.approx(expected, rel=1e-12)


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


def test_non_contiguous_inputs() -> None:
    generator = torch.Generator().manual_seed(11)
    proxies = torch.randn(2, 16, 6, 80, generator=generator).transpose(1, 2)  # (2, 6, 16, 80)
    keys = torch.randn(2, 3, 180, 80, generator=generator)[:, :, ::2]  # (2, 3, 90, 80)
    last = torch.randn(2, 80, 6, generator=generator).transpose(1, 2)  # (2, 6, 80)
    assert not any(t.is_contiguous() for t in (proxies, keys, last))
    options = {"n_groups": 4, "tau": 0.8, "scaling": 80**-0.5, "anchor_in_groups": True}
    op = shiftkv_scores(proxies, keys, last, backend="compiled", **options)
    contiguous = (t.contiguous() for t in (proxies, keys, last))
    assert torch.equal(op, shiftkv_scores(*contiguous, backend="compiled", **options))
