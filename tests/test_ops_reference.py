"""The torch reference of ShiftKV scoring on cases small enough to check by hand.

Expected values are worked out in each test from the definition (softmax of hand-picked logits,
sorted masses, coverage sums), never by calling the reference a second time.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmshiftkv.ops import group_attention_mass, shiftkv_scores_reference, votes_from_mass
from mmshiftkv.presses.selection import select_kept_indices


def _inputs(
    proxy: list[float], keys: list[list[float]], last: list[float], n_proxies: int, q_heads: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch, one KV head serving ``q_heads`` query heads; every proxy is ``proxy``."""
    proxies = torch.tensor(proxy, dtype=torch.float32).expand(1, q_heads, n_proxies, len(proxy)).contiguous()
    key_tensor = torch.tensor(keys, dtype=torch.float32)[None, None]
    last_query = torch.tensor(last, dtype=torch.float32).expand(1, q_heads, len(last)).contiguous()
    return proxies, key_tensor, last_query


def test_one_token_with_all_the_mass_gets_every_vote() -> None:
    # Logit 1000 for token 2, 0 elsewhere: exp(-1000) is exactly 0, so token 2 holds all the mass.
    proxies, keys, last = _inputs(
        [1.0, 0.0], [[0, 0], [0, 0], [10, 0], [0, 0], [0, 0]], [1.0, 0.0], 8, q_heads=2
    )
    scores = shiftkv_scores_reference(proxies, keys, last, n_groups=4, tau=0.95, scaling=100.0)
    assert scores.tolist() == [[[0.0, 0.0, 4.0 + 1.0, 0.0, 0.0]]]


def test_tau_one_votes_every_key_with_nonzero_mass_even_tiny() -> None:
    # Logits 0, -10, ..., -50: the last masses are ~1e-22 of the total, which a prefix sum would
    # absorb before reaching the total; every one of them is still voted.
    keys = [[-10.0 * t, 0.0] for t in range(6)]
    proxies, key_tensor, last = _inputs([1.0, 0.0], keys, [0.0, 0.0], 4)
    mass, _ = group_attention_mass(proxies, key_tensor, last, n_groups=2, scaling=1.0)
    assert bool((mass > 0).all())
    scores = shiftkv_scores_reference(proxies, key_tensor, last, n_groups=2, tau=1.0, scaling=1.0)
    # last_query = 0 attends uniformly: anchor = 1/6 everywhere.
    assert torch.allclose(scores, torch.full((1, 1, 6), 2.0 + 1.0 / 6.0))


def test_single_group_small_tau_votes_the_argmax() -> None:
    proxies, keys, last = _inputs([1.0, 0.0], [[1, 0], [3, 0], [2, 0]], [0.0, 0.0], 2)
    mass, _ = group_attention_mass(proxies, keys, last, n_groups=1, scaling=1.0)
    z = math.exp(1) + math.exp(3) + math.exp(2)
    expected = torch.tensor([math.exp(1), math.exp(3), math.exp(2)], dtype=torch.float64) * 2 / z
    assert torch.allclose(mass[0, 0, 0], expected, rtol=1e-14)
    scores = shiftkv_scores_reference(
        proxies, keys, last, n_groups=1, tau=0.01, scaling=1.0, anchor_weight=0.0
    )
    assert scores.tolist() == [[[0.0, 1.0, 0.0]]]


def test_equal_votes_are_ranked_by_the_anchor() -> None:
    # Proxies orthogonal to every key attend uniformly: with tau = 1 every token gets both votes.
    proxies, keys, last = _inputs([0.0, 1.0], [[0, 0], [1, 0], [0, 0], [0, 0]], [5.0, 0.0], 4)
    scores = shiftkv_scores_reference(proxies, keys, last, n_groups=2, tau=1.0, scaling=1.0)
    z = 3 + math.exp(5)
    expected = torch.tensor([[[2 + 1 / z, 2 + math.exp(5) / z, 2 + 1 / z, 2 + 1 / z]]])
    assert torch.allclose(scores, expected)
    indices, lengths = select_kept_indices(scores, 2)
    assert indices.tolist() == [[[1, 3]]] and lengths.tolist() == [[2]]


@pytest.mark.parametrize(
    ("mass", "tau", "smallest", "within"),
    [
        # cumsum 0.5, 0.8, 1.0: covering 0.7 takes two tokens; staying within 0.7 only one.
        ([0.5, 0.3, 0.2], 0.7, [True, True, False], [True, False, False]),
        # equal masses: taken in index order.
        ([0.25, 0.25, 0.25, 0.25], 0.6, [True, True, True, False], [True, True, False, False]),
        # the top token alone exceeds tau: "within" votes for nothing.
        ([0.2, 0.7, 0.1], 0.5, [False, True, False], [False, False, False]),
        # tau = 1: every token with mass, never a zero-mass one.
        ([0.6, 0.0, 0.4], 1.0, [True, False, True], [True, False, True]),
        # no mass at all: no votes.
        ([0.0, 0.0], 0.9, [False, False], [False, False]),
    ],
)
def test_coverage_rules(mass: list[float], tau: float, smallest: list[bool], within: list[bool]) -> None:
    row = torch.tensor([mass], dtype=torch.float64)
    assert votes_from_mass(row, tau, "smallest").tolist() == [smallest]
    assert votes_from_mass(row, tau, "within").tolist() == [within]


def test_anchor_in_groups_mixes_the_anchor_into_each_group() -> None:
    # Two proxies (one group) attend uniformly to two tokens: group mass [1, 1], a tie.
    proxies, keys, last = _inputs([0.0, 1.0], [[0, 0], [1, 0]], [2.0, 0.0], 2)
    anchor = torch.tensor([1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))], dtype=torch.float64)
    plain, plain_anchor = group_attention_mass(proxies, keys, last, n_groups=1, scaling=1.0)
    mixed, _ = group_attention_mass(proxies, keys, last, n_groups=1, scaling=1.0, anchor_in_groups=True)
    assert torch.allclose(plain[0, 0, 0], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(plain_anchor[0, 0], anchor)
    assert torch.allclose(mixed[0, 0, 0], (torch.tensor([1.0, 1.0], dtype=torch.float64) + anchor) / 3)
    # tau = 0.5 covers one token: the tie goes to token 0; the anchor tips it to token 1.
    common = {"n_groups": 1, "tau": 0.5, "scaling": 1.0, "anchor_weight": 0.0}
    assert shiftkv_scores_reference(proxies, keys, last, **common).tolist() == [[[1.0, 0.0]]]
    mixed_scores = shiftkv_scores_reference(proxies, keys, last, anchor_in_groups=True, **common)
    assert mixed_scores.tolist() == [[[0.0, 1.0]]]


def test_exclude_last_key_zeroes_it_without_renormalising() -> None:
    proxies, keys, last = _inputs([0.0, 1.0], [[0, 0]] * 4, [0.0, 0.0], 2)
    mass, anchor = group_attention_mass(proxies, keys, last, n_groups=1, scaling=1.0, exclude_last_key=True)
    assert mass.tolist() == [[[[0.5, 0.5, 0.5, 0.0]]]]
    assert anchor.tolist() == [[[0.25, 0.25, 0.25, 0.0]]]
    scores = shiftkv_scores_reference(
        proxies, keys, last, n_groups=1, tau=1.0, scaling=1.0, exclude_last_key=True
    )
    assert scores.tolist() == [[[1.25, 1.25, 1.25, 0.0]]]


def test_padding_keys_get_no_attention_and_no_vote() -> None:
    # Padding key 0 would take all the attention if it were real.
    proxies, keys, last = _inputs([1.0, 0.0], [[100, 0], [0, 0], [0, 0], [0, 0]], [1.0, 0.0], 4)
    key_mask = torch.tensor([[False, True, True, True]])
    mass, anchor = group_attention_mass(proxies, keys, last, n_groups=2, scaling=1.0, key_mask=key_mask)
    assert mass.tolist() == [[[[0.0, 2 / 3, 2 / 3, 2 / 3]] * 2]]
    assert anchor.tolist() == [[[0.0, 1 / 3, 1 / 3, 1 / 3]]]
    scores = shiftkv_scores_reference(
        proxies, keys, last, n_groups=2, tau=1.0, scaling=1.0, key_mask=key_mask
    )
    assert scores[0, 0, 0] == float("-inf")
    assert torch.allclose(scores[0, 0, 1:], torch.full((3,), 2 + 1 / 3))


def test_a_sample_that_is_all_padding_scores_minus_infinity_without_nan() -> None:
    proxies, keys, last = _inputs([1.0, 0.0], [[1, 0], [0, 1]], [1.0, 0.0], 2)
    key_mask = torch.tensor([[False, False]])
    mass, anchor = group_attention_mass(proxies, keys, last, n_groups=1, scaling=1.0, key_mask=key_mask)
    assert mass.abs().sum() == 0 and anchor.abs().sum() == 0
    scores = shiftkv_scores_reference(
        proxies, keys, last, n_groups=1, tau=0.9, scaling=1.0, key_mask=key_mask
    )
    assert scores.tolist() == [[[float("-inf")] * 2]]


def test_group_mass_matches_a_plain_loop_over_heads_and_proxies() -> None:
    # GQA: 2 KV heads serving 3 query heads each; groups of 2 consecutive proxies.
    generator = torch.Generator().manual_seed(0)
    batch, q_heads, kv_heads, n_proxies, n_groups, seq_len, dim = 2, 6, 2, 8, 4, 9, 5
    proxies = torch.randn(batch, q_heads, n_proxies, dim, generator=generator)
    keys = torch.randn(batch, kv_heads, seq_len, dim, generator=generator)
    last = torch.randn(batch, q_heads, dim, generator=generator)
    mass, anchor = group_attention_mass(proxies, keys, last, n_groups=n_groups, scaling=0.7)
    r, g = q_heads // kv_heads, n_proxies // n_groups
    for b in range(batch):
        for h in range(kv_heads):
            key_rows = keys[b, h].double()
            expected_anchor = sum(
                torch.softmax(0.7 * (key_rows @ last[b, q].double()), dim=0)
                for q in range(h * r, (h + 1) * r)
            )
            assert torch.allclose(anchor[b, h], expected_anchor / r, rtol=1e-12)
            for j in range(n_groups):
                expected = sum(
                    torch.softmax(0.7 * (key_rows @ proxies[b, q, i].double()), dim=0)
                    for q in range(h * r, (h + 1) * r)
                    for i in range(j * g, (j + 1) * g)
                )
                assert torch.allclose(mass[b, h, j], expected / r, rtol=1e-12)


def test_reference_validates_its_inputs() -> None:
    proxies, keys, last = _inputs([1.0, 0.0], [[1, 0], [0, 1]], [1.0, 0.0], 4)
    with pytest.raises(ValueError, match="divisible"):
        group_attention_mass(proxies, keys, last, n_groups=3, scaling=1.0)
    with pytest.raises(ValueError, match="tau"):
        votes_from_mass(torch.ones(1, 3), 0.0)
    with pytest.raises(ValueError, match="coverage"):
        votes_from_mass(torch.ones(1, 3), 0.5, "largest")
