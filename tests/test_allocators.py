"""Composition tests against allocator tables.

Every expected table is either written out by hand or computed by a plain transcription of the
reference formula (KVCache-Factory PyramidKV, FFY0/AdaKV, CR400AF-A/SparseMM) written below with
Python ints and loops, never by calling the allocator under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmshiftkv.allocators import (
    AdaAllocator,
    Allocator,
    PyramidAllocator,
    SparseMMAllocator,
    UniformAllocator,
)

# ---------------------------------------------------------------------------------------------
# Plain transcriptions of the reference formulas (one sample, one layer -> list per KV head).
# Shared rule of the library on top of the references: n <= B is never compressed; counts are
# clipped to [1, n].
# ---------------------------------------------------------------------------------------------


def ref_pyramid(n_layers: int, budget: int, window: int, beta: float, n: int, layer: int) -> int:
    """KVCache-Factory PyramidKVCluster.update_kv, as a count of kept tokens."""
    if n < budget:
        return n
    if n < (budget - window) * 2:
        return budget
    min_num = int((budget - window) // beta)
    max_num = (budget - window) * 2 - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = (budget - window) * 2 - max_num
    steps = (max_num - min_num) // (n_layers - 1)
    return max(1, min(n, max_num - layer * steps + window))


def ref_ada(
    scores: list[list[float]], n: int, budget: int, window: int, alpha: float, normalize: bool = False
) -> list[int]:
    """FFY0/AdaKV AdaptiveSnapKVCluster head capacities for one (left-padded) sample."""
    n_heads, seq_len = len(scores), len(scores[0])
    if n <= budget:
        return [n] * n_heads
    base = budget - window
    ranked = []
    for row in scores:
        values = [-math.inf if math.isnan(v) else v for v in row[seq_len - n : seq_len - window]]
        values.sort(reverse=True)
        if normalize:
            ratio = sum(values[:base]) / sum(values)
            if math.isfinite(ratio):
                values = [v * ratio for v in values]
        ranked.append(values)
    entries = [(-v, rank, h) for h, values in enumerate(ranked) for rank, v in enumerate(values)]
    entries.sort()
    counts = [0] * n_heads
    for _, _, h in entries[: n_heads * base]:
        counts[h] += 1
    floor = int(base * alpha)
    # torch.round(int_tensor * (1 - alpha) + floor): float32 arithmetic, round half to even.
    caps = [int(np.round(np.float32(c) * np.float32(1 - alpha) + np.float32(floor))) for c in counts]
    return [max(1, min(n, cap + window)) for cap in caps]


def ref_sparsemm(
    head_scores: dict[str, list[float]],
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    budget: int,
    window: int,
    ratio: float,
    n: int,
) -> list[list[int]]:
    """CR400AF-A/SparseMM SparseMM.__init__ / update_kv: kept tokens per (layer, KV head)."""
    if n <= budget:
        return [[n] * n_kv_heads for _ in range(n_layers)]
    means = [sum(v) / len(v) for v in head_scores.values()]  # keys are in layer-head order
    total = sum(means)
    normalized = [m / total for m in means]
    group = n_heads // n_kv_heads
    base = budget - window
    min_cache = int(base * ratio)
    remain = (base - min_cache) * n_layers * n_heads // group
    table = []
    for layer in range(n_layers):
        row = []
        for kv in range(n_kv_heads):
            score = sum(normalized[layer * n_heads + kv * group + g] for g in range(group))
            cap = round(score * remain + min_cache)  # Python round: half to even, like torch.round
            row.append(max(1, min(cap, n - window) + window))
        table.append(row)
    return table


def allocate_all(allocator: Allocator, budget: int, n_tokens: list[int], scores=None) -> torch.Tensor:
    """(n_layers, batch, kv_heads) table; `scores` is one (batch, kv, seq) tensor per layer."""
    return torch.stack(
        [
            allocator.allocate(
                budget, layer, torch.tensor(n_tokens), None if scores is None else scores[layer]
            )
            for layer in range(allocator.n_layers)
        ]
    )


def left_padded_scores(n_tokens: list[int], kv_heads: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(n_tokens), kv_heads, seq_len, generator=gen)
    for b, n in enumerate(n_tokens):
        scores[b, :, : seq_len - n] = float("-inf")
        scores[b, :, -1] = float("inf")
    return scores


# ---------------------------------------------------------------------------------------------
# Uniform
# ---------------------------------------------------------------------------------------------


def test_uniform_table_and_total():
    alloc = UniformAllocator()
    alloc.bind(n_layers=3, n_heads=8, n_kv_heads=2)
    kept = allocate_all(alloc, 64, [10, 64, 65, 500])
    assert kept.dtype == torch.int64 and kept.shape == (3, 4, 2)
    expected = torch.tensor([10, 64, 64, 64])[None, :, None].expand(3, 4, 2)
    assert torch.equal(kept, expected)
    assert kept[:, 3].sum() == 3 * 2 * 64


# ---------------------------------------------------------------------------------------------
# PyramidKV
# ---------------------------------------------------------------------------------------------


def test_pyramid_hand_table():
    # L=4, B=32, W=8, beta=20: B'=24, min=24//20=1, max=47.
    #   n=100: 47 < 92, steps=(47-1)//3=15 -> 47,32,17,2 (+8)
    #   n=50 : 47 >= 42 -> max=42, min=48-42=6, steps=36//3=12 -> 42,30,18,6 (+8)
    #   n=40 : 32 <= 40 < 48 -> B everywhere;  n=32: n == B, not compressed;  n=20: n < B
    alloc = PyramidAllocator(beta=20, window=8)
    alloc.bind(n_layers=4, n_heads=4, n_kv_heads=2)
    kept = allocate_all(alloc, 32, [100, 50, 40, 32, 20])
    per_layer = torch.tensor(
        [
            [55, 50, 32, 32, 20],
            [40, 38, 32, 32, 20],
            [25, 26, 32, 32, 20],
            [10, 14, 32, 32, 20],
        ]
    )
    assert torch.equal(kept, per_layer[:, :, None].expand(4, 5, 2))


def test_pyramid_qwen_like_hand_table():
    # L=28, B=64, W=32, beta=20, long prompt: B'=32, min=1, max=63, steps=62//27=2 -> 95 - 2l.
    alloc = PyramidAllocator()
    alloc.bind(n_layers=28, n_heads=28, n_kv_heads=4)
    kept = allocate_all(alloc, 64, [2000])[:, 0]
    assert torch.equal(kept, torch.tensor([95 - 2 * layer for layer in range(28)])[:, None].expand(28, 4))
    # Total: L*B + (L/2) * ((max-min) mod (L-1)) = 28*64 + 14*8 per KV head.
    assert kept.sum() == 4 * (28 * 64 + 14 * 8)


@pytest.mark.parametrize(
    "n_layers, budget, window, beta, n_tokens",
    [
        (4, 32, 8, 20, [100, 50, 47, 46, 40, 33, 32, 31, 5]),
        (32, 128, 32, 20, [4000, 300, 290, 200, 191, 150, 128, 64]),
        (7, 100, 10, 5, [1000, 200, 185, 179, 120, 101]),
        (5, 64, 0, 3, [1000, 130, 127, 100, 65]),
        (3, 40, 32, 2, [100, 41, 40]),
        (6, 50, 4, 2.5, [300, 100, 93, 92, 60]),
    ],
)
def test_pyramid_matches_reference(n_layers, budget, window, beta, n_tokens):
    alloc = PyramidAllocator(beta=beta, window=window)
    alloc.bind(n_layers=n_layers, n_heads=6, n_kv_heads=3)
    kept = allocate_all(alloc, budget, n_tokens)
    for layer in range(n_layers):
        for b, n in enumerate(n_tokens):
            expected = ref_pyramid(n_layers, budget, window, beta, n, layer)
            assert kept[layer, b].tolist() == [expected] * 3, (layer, n)
    # Total per KV head vs Uniform: exact in the two first cases, + the floor remainder otherwise.
    base = budget - window
    for b, n in enumerate(n_tokens):
        total = int(kept[:, b, 0].sum())
        if n < 2 * base or n <= budget:
            assert total == n_layers * min(budget, n)
        else:
            max_num = min(2 * base - int(base // beta), n - window)
            remainder = (2 * max_num - 2 * base) % (n_layers - 1)  # max - min with min = 2B' - max
            assert total == n_layers * budget + n_layers * remainder // 2


def test_pyramid_clips_to_one_token():
    # W=0, B=10, L=3, beta=20: min=0, max=20, steps=10 -> 20, 10, 0 -> the last layer is clipped to 1.
    alloc = PyramidAllocator(window=0)
    alloc.bind(n_layers=3, n_heads=2, n_kv_heads=1)
    assert allocate_all(alloc, 10, [1000]).flatten().tolist() == [20, 10, 1]


def test_pyramid_single_layer_is_uniform():
    alloc = PyramidAllocator(window=8)
    alloc.bind(n_layers=1, n_heads=2, n_kv_heads=2)
    assert allocate_all(alloc, 32, [1000, 10]).tolist() == [[[32, 32], [10, 10]]]


# ---------------------------------------------------------------------------------------------
# AdaKV
# ---------------------------------------------------------------------------------------------


def ada_scores(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None]


def test_ada_hand_table():
    # H=2, B=5, W=2 -> B'=3, alpha=0.2 -> floor=int(0.6)=0; n=8 -> the first 6 tokens compete.
    # Top 6 of {9,8,7,1,1,1 | 6,5,0,0,0,0}: 9,8,7,6,5 and one 1 (head 0) -> counts [4, 2]
    # caps: round(3.2)=3, round(1.6)=2 -> kept [5, 4]. The window scores (100) are ignored.
    alloc = AdaAllocator(alpha=0.2, window=2)
    alloc.bind(n_layers=1, n_heads=4, n_kv_heads=2)
    scores = ada_scores([[9, 8, 7, 1, 1, 1, 100, 100], [6, 5, 0, 0, 0, 0, 100, 100]])
    assert alloc.allocate(5, 0, torch.tensor([8]), scores).tolist() == [[5, 4]]


def test_ada_ties_split_by_rank_then_head():
    alloc = AdaAllocator(alpha=0.2, window=2)
    alloc.bind(n_layers=1, n_heads=2, n_kv_heads=2)
    # All equal: ranks 0,0,1,1,2,2 -> counts [3, 3] -> caps round(2.4)=2 -> kept [4, 4].
    assert alloc.allocate(5, 0, torch.tensor([8]), torch.ones(1, 2, 8)).tolist() == [[4, 4]]
    # Head 0 has one 5 then 1s; head 1 all 1s. Top 6: 5 (h0), then 1s ordered by (rank, head):
    # h1r0, h0r1, h1r1, h0r2, h1r2 -> counts [3, 3].
    scores = ada_scores([[1, 1, 5, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    assert alloc.allocate(5, 0, torch.tensor([8]), scores).tolist() == [[4, 4]]
    # Three heads, B'=1: top 3 of all-equal scores -> one per head.
    alloc.bind(n_layers=1, n_heads=3, n_kv_heads=3)
    assert alloc.allocate(3, 0, torch.tensor([6]), torch.ones(1, 3, 6)).tolist() == [[3, 3, 3]]


def test_ada_rounds_in_float32_half_to_even():
    # alpha=0.7, B=2, W=1 -> B'=1, floor=0; 16 heads, head 0 takes 15 of the top 16, head 1 one.
    # cap0 = round(15 * float32(0.3)) = round(4.5 in float32) = 4 (float64 would give 4.500...01 -> 5).
    n_heads = 16
    rows = [[0.0] * 17 for _ in range(n_heads)]
    rows[0] = [10.0] * 15 + [0.0, 0.0]
    rows[1] = [5.0] + [0.0] * 16
    alloc = AdaAllocator(alpha=0.7, window=1)
    alloc.bind(n_layers=1, n_heads=n_heads, n_kv_heads=n_heads)
    kept = alloc.allocate(2, 0, torch.tensor([17]), ada_scores(rows))
    assert kept.tolist() == [[5] + [1] * 15]
    # alpha=0.5 puts caps on .5 -> half to even. H=2, B=7, W=1: B'=6, floor=3, n=12 -> 11 candidates
    # per head. Head 0: seven 9s, head 1: five 8s -> top 12 = counts [7, 5].
    # caps: round(3.5 + 3) = 6, round(2.5 + 3) = 6 -> kept [7, 7].
    rows = [[9.0] * 7 + [0.0] * 5, [8.0] * 5 + [0.0] * 7]
    alloc = AdaAllocator(alpha=0.5, window=1)
    alloc.bind(n_layers=1, n_heads=2, n_kv_heads=2)
    assert alloc.allocate(7, 0, torch.tensor([12]), ada_scores(rows)).tolist() == [[7, 7]]


def test_ada_normalize_hand_table():
    # H=2, B=3, W=1 -> B'=2, alpha=0, n=5 -> 4 candidates per head.
    # Head 0 [4, 2.5, 2.5, 0]: ratio (6.5/9) -> 2.889, 1.806, 1.806, 0. Head 1 [3]*4: ratio 0.5 -> 1.5s.
    # Plain: top 4 = 4,3,3,3 -> counts [1, 3] -> kept [2, 4]. Normalized: 2.889,1.806,1.806,1.5 -> [4, 2].
    scores = ada_scores([[4, 2.5, 2.5, 0, 7], [3, 3, 3, 3, 7]])
    plain, normalized = AdaAllocator(alpha=0.0, window=1), AdaAllocator(alpha=0.0, window=1, normalize=True)
    for alloc in (plain, normalized):
        alloc.bind(n_layers=1, n_heads=2, n_kv_heads=2)
    assert plain.allocate(3, 0, torch.tensor([5]), scores).tolist() == [[2, 4]]
    assert normalized.allocate(3, 0, torch.tensor([5]), scores).tolist() == [[4, 2]]


def test_ada_not_compressed_when_prompt_fits():
    # n <= B (i.e. B' > n - W or B' == n - W): every head keeps n, whatever the scores.
    alloc = AdaAllocator(window=4)
    alloc.bind(n_layers=2, n_heads=2, n_kv_heads=2)
    scores = left_padded_scores([16, 15, 3], kv_heads=2, seq_len=16, seed=0)
    assert alloc.allocate(16, 1, torch.tensor([16, 15, 3]), scores).tolist() == [[16, 16], [15, 15], [3, 3]]


@pytest.mark.parametrize(
    "n_layers, kv_heads, budget, window, alpha, normalize, n_tokens, seq_len",
    [
        (3, 4, 16, 4, 0.2, False, [60, 40, 17, 16, 9], 60),
        (2, 2, 40, 32, 0.2, False, [100, 73, 41], 100),
        (2, 8, 20, 0, 0.5, False, [50, 21], 50),
        (2, 4, 24, 8, 0.0, False, [64, 30], 64),
        (2, 4, 24, 8, 1.0, False, [64, 30], 64),
        (2, 3, 12, 2, 0.3, True, [40, 25, 13], 40),
        (1, 4, 33, 1, 0.2, True, [90, 34], 90),
    ],
)
def test_ada_matches_reference(n_layers, kv_heads, budget, window, alpha, normalize, n_tokens, seq_len):
    alloc = AdaAllocator(alpha=alpha, window=window, normalize=normalize)
    alloc.bind(n_layers=n_layers, n_heads=2 * kv_heads, n_kv_heads=kv_heads)
    scores = [left_padded_scores(n_tokens, kv_heads, seq_len, seed=layer) for layer in range(n_layers)]
    kept = allocate_all(alloc, budget, n_tokens, scores)
    base = budget - window
    for layer in range(n_layers):
        for b, n in enumerate(n_tokens):
            expected = ref_ada(scores[layer][b].tolist(), n, budget, window, alpha, normalize)
            assert kept[layer, b].tolist() == expected, (layer, n)
            # Total over a layer's heads: H*B minus H*frac(B'*alpha), up to H/2 of rounding.
            if n > budget:
                ideal = kv_heads * budget - kv_heads * (base * alpha - int(base * alpha))
                assert abs(kept[layer, b].sum().item() - ideal) <= kv_heads / 2 + 1e-3


def test_ada_batch_rows_are_independent_and_ignore_padding():
    alloc = AdaAllocator(alpha=0.2, window=4)
    alloc.bind(n_layers=1, n_heads=4, n_kv_heads=4)
    n_tokens = [48, 30, 20]
    scores = left_padded_scores(n_tokens, kv_heads=4, seq_len=48, seed=3)
    batched = alloc.allocate(16, 0, torch.tensor(n_tokens), scores)
    for b, n in enumerate(n_tokens):
        alone = alloc.allocate(16, 0, torch.tensor([n]), scores[b : b + 1, :, -n:])
        assert torch.equal(batched[b : b + 1], alone)
    # Changing what sits in the padding (or in another sample) changes nothing.
    noisy = scores.clone()
    noisy[1, :, : 48 - 30] = 1e9
    noisy[0] = torch.rand(4, 48)
    assert torch.equal(alloc.allocate(16, 0, torch.tensor(n_tokens), noisy)[1:], batched[1:])


def test_ada_nan_scores_rank_last():
    alloc = AdaAllocator(alpha=0.0, window=1)
    alloc.bind(n_layers=1, n_heads=2, n_kv_heads=2)
    nan = float("nan")
    # B=3, W=1 -> B'=2, n=4 -> 3 candidates per head; NaN ranks as -inf. Top 4 of {-inf x3 | 0 x3}:
    # head 1's three 0s, then one -inf of head 0 -> counts [1, 3] -> kept [2, 4].
    scores = ada_scores([[nan, nan, nan, 1], [0, 0, 0, 1]])
    assert alloc.allocate(3, 0, torch.tensor([4]), scores).tolist() == [[2, 4]]


# ---------------------------------------------------------------------------------------------
# SparseMM
# ---------------------------------------------------------------------------------------------


def grid(means: list[list[list[float]]]) -> dict[str, list[float]]:
    return {f"{layer}-{head}": values for layer, row in enumerate(means) for head, values in enumerate(row)}


def test_sparsemm_hand_table():
    # L=2, 4 query heads, 2 KV heads (consecutive pairs), B=14, W=4 -> B'=10, ratio 0.1 -> min=1,
    # remain = 9 * 2 * 2 = 36. Means: layer 0 [1, 0, 0, 0], layer 1 [1, 2, 0, 4] (sum 8).
    # KV scores: l0 (1/8, 0), l1 (3/8, 4/8) -> caps round(5.5)=6, 1, round(14.5)=14, 19 (half to even).
    scores = grid(
        [[[0.5, 1.5], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [4.0, 4.0]]]
    )
    alloc = SparseMMAllocator(head_scores=scores, ratio=0.1, window=4)
    alloc.bind(n_layers=2, n_heads=4, n_kv_heads=2)
    kept = allocate_all(alloc, 14, [100, 20, 14, 10])
    assert kept[:, 0].tolist() == [[10, 5], [18, 23]]
    assert kept[:, 0].sum() == 2 * 2 * 14  # Uniform's total, rounding happened to cancel
    assert kept[:, 1].tolist() == [[10, 5], [18, 20]]  # min(19, n - W = 16) + 4
    assert kept[:, 2].tolist() == [[14, 14], [14, 14]]  # n == B: not compressed
    assert kept[:, 3].tolist() == [[10, 10], [10, 10]]  # n < B: B' > n - W


@pytest.mark.parametrize(
    "n_layers, n_heads, n_kv_heads, budget, window, ratio, n_tokens",
    [
        (3, 8, 2, 64, 32, 0.1, [500, 100, 64, 40]),
        (4, 4, 4, 40, 8, 0.0, [300, 45, 41]),
        (2, 6, 3, 100, 0, 0.5, [1000, 101]),
        (5, 4, 1, 33, 32, 0.1, [200, 34]),
        (3, 8, 2, 64, 32, 1.0, [500, 100, 64, 40]),
    ],
)
def test_sparsemm_matches_reference(n_layers, n_heads, n_kv_heads, budget, window, ratio, n_tokens):
    gen = torch.Generator().manual_seed(n_layers * 100 + n_heads)
    raw = torch.rand(3, n_layers, n_heads, generator=gen) ** 3  # a few dominant "visual heads"
    scores = grid(raw.permute(1, 2, 0).tolist())
    alloc = SparseMMAllocator(head_scores=scores, ratio=ratio, window=window)
    alloc.bind(n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads)
    kept = allocate_all(alloc, budget, n_tokens)
    for b, n in enumerate(n_tokens):
        expected = ref_sparsemm(scores, n_layers, n_heads, n_kv_heads, budget, window, ratio, n)
        assert kept[:, b].tolist() == expected, n
    # Long prompt: total over all layers and heads = Uniform's, up to the rounding of each cap.
    total = kept[:, 0].sum().item()
    assert abs(total - n_layers * n_kv_heads * budget) <= n_layers * n_kv_heads / 2


def test_sparsemm_ratio_one_gives_every_head_the_budget():
    # ratio=1 (accepted by the reference): min = B' = 10, remain = 0, cap = 10 + W = B for every head,
    # whatever the scores (n = 15: min(10, n - W = 11) + 4 = 14); n = 13 <= B is not compressed.
    scores = grid([[[1.0], [0.0], [0.0], [9.0]], [[0.0], [0.0], [0.0], [5.0]]])
    alloc = SparseMMAllocator(head_scores=scores, ratio=1.0, window=4)
    alloc.bind(n_layers=2, n_heads=4, n_kv_heads=2)
    kept = allocate_all(alloc, 14, [100, 15, 13])
    assert kept[:, 0].tolist() == [[14, 14], [14, 14]]
    assert kept[:, 1].tolist() == [[14, 14], [14, 14]]
    assert kept[:, 2].tolist() == [[13, 13], [13, 13]]


def test_sparsemm_rejects_scores_whose_normalisation_overflows():
    # Each mean is finite (1e308) but their sum overflows: normalised they would all be 0.
    with pytest.raises(ValueError, match="sum to inf.*rescale"):
        SparseMMAllocator(head_scores={"0-0": [1e308], "0-1": [1e308]})
    # A head's own mean overflows (sum of its list).
    with pytest.raises(ValueError, match="layer 0 head 1 overflow float64"):
        SparseMMAllocator(head_scores={"0-0": [1.0], "0-1": [1e308, 1e308]})


def test_sparsemm_reads_a_file(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("""{
    "0-0": [
        0.0,
        2.0
    ],
    "0-1": [
        3.0,
        3.0
    ]
}""")
    alloc = SparseMMAllocator(head_scores=path, ratio=0.0, window=0)
    alloc.bind(n_layers=1, n_heads=2, n_kv_heads=2)
    # B'=10, min=0, remain=10*1*2=20; scores (1/4, 3/4) -> caps 5, 15.
    assert alloc.allocate(10, 0, torch.tensor([100])).tolist() == [[5, 15]]


def test_sparsemm_rejects_scores_of_another_model():
    alloc = SparseMMAllocator(head_scores=grid([[[1.0]] * 4] * 2))
    with pytest.raises(ValueError, match=r"2 layers x 4 query heads.*28 layers x 28 query heads"):
        alloc.bind(n_layers=28, n_heads=28, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"2 layers x 4 query heads.*2 layers x 8 query heads"):
        alloc.bind(n_layers=2, n_heads=8, n_kv_heads=4)
    alloc.bind(n_layers=2, n_heads=4, n_kv_heads=2)


def test_sparsemm_rejects_all_zero_scores():
    with pytest.raises(ValueError, match="all zero"):
        SparseMMAllocator(head_scores=grid([[[0.0], [0.0]]]))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

ONE_HEAD = {"0-0": [1.0]}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AdaAllocator(alpha=-0.1), "alpha"),
        (lambda: AdaAllocator(alpha=1.5), "alpha"),
        (lambda: AdaAllocator(alpha=float("nan")), "alpha"),
        (lambda: AdaAllocator(window=-1), "window"),
        (lambda: AdaAllocator(normalize="yes"), "normalize"),
        (lambda: PyramidAllocator(beta=0), "beta"),
        (lambda: PyramidAllocator(beta=-2), "beta"),
        (lambda: PyramidAllocator(window=2.5), "window"),
        (lambda: SparseMMAllocator(ONE_HEAD, ratio=1.5), "ratio"),
        (lambda: PyramidAllocator(beta=float("inf")), "beta"),
        (lambda: SparseMMAllocator(ONE_HEAD, ratio=-0.1), "ratio"),
        (lambda: SparseMMAllocator(ONE_HEAD, window=-3), "window"),
    ],
)
def test_hyper_parameter_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "alloc", [PyramidAllocator(window=32), AdaAllocator(window=32), SparseMMAllocator(ONE_HEAD, window=32)]
)
def test_budget_must_exceed_window(alloc):
    alloc.bind(n_layers=1, n_heads=1, n_kv_heads=1)
    scores = torch.rand(1, 1, 100)
    with pytest.raises(ValueError, match=r"budget \(32\) must be larger than window \(32\)"):
        alloc.allocate(32, 0, torch.tensor([100]), scores)


def test_allocate_input_validation():
    alloc = UniformAllocator()
    with pytest.raises(RuntimeError, match="bind"):
        alloc.allocate(8, 0, torch.tensor([10]))
    with pytest.raises(ValueError, match="multiple"):
        alloc.bind(n_layers=2, n_heads=6, n_kv_heads=4)
    alloc.bind(n_layers=2, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="budget"):
        alloc.allocate(0, 0, torch.tensor([10]))
    with pytest.raises(ValueError, match="layer_idx"):
        alloc.allocate(8, 2, torch.tensor([10]))
    with pytest.raises(ValueError, match="at least one"):
        alloc.allocate(8, 0, torch.tensor([10, 0]))
    ada = AdaAllocator(window=2)
    ada.bind(n_layers=1, n_heads=2, n_kv_heads=2)
    with pytest.raises(ValueError, match="needs the press's scores"):
        ada.allocate(8, 0, torch.tensor([10]))
    with pytest.raises(ValueError, match="kv_heads=2"):
        ada.allocate(8, 0, torch.tensor([10]), torch.rand(1, 3, 10))
    with pytest.raises(ValueError, match="exceed"):
        ada.allocate(8, 0, torch.tensor([11]), torch.rand(1, 2, 10))
