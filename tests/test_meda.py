"""MEDA's layer budgets: the released code's entropies and layer ratios, hand tables, every family.

``tests/data/meda_entropy_layer_ratios.pt`` holds, for 4 layers (2 heads, 40 tokens: text 0-5, image
6-29, text 30-39), queries, keys and their causal attention, and what AIoT-MLSys-Lab/MEDA @ 0e1a53b
computed from them: ``compute_multimodal_entropy`` (the entropy its runs use), the paper's
``compute_crossmodal_entropy`` (defined, never called there) and the layer ratios of its
``LlamaModel.forward`` (``clamp(softmax(E) * L * 0.2, 0.01, 1)``) for both.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmshiftkv.allocators import MEDAAllocator, QueryBlock
from mmshiftkv.models import get_adapter
from mmshiftkv.presses import SnapKVPress
from mmshiftkv.registry import make_allocator
from mmshiftkv.testing import ALL_FAMILIES, QUESTION, greedy_under, make_inputs, tiny, tiny_sharpened

ORACLE = Path(__file__).parent / "data" / "meda_entropy_layer_ratios.pt"
RHO = 0.1 + 0.1  # the reference run's hh_ratio + recent_ratio


def oracle() -> dict:
    return torch.load(ORACLE, weights_only=True)


def oracle_blocks(case: dict, layer: int, rows: int = 13) -> list[QueryBlock]:
    """The layer's logits ``q k^T / sqrt(d)`` in blocks of ``rows`` queries, causal visibility."""
    queries, keys = case[f"layer{layer}/queries"], case[f"layer{layer}/keys"]
    seq_len, head_dim = keys.shape[2], keys.shape[3]
    logits = queries @ keys.transpose(-1, -2) / math.sqrt(head_dim)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return [
        QueryBlock(
            logits=logits[:, :, start : start + rows],
            query_index=torch.arange(start, min(start + rows, seq_len)),
            queries=torch.ones(1, min(rows, seq_len - start), dtype=torch.bool),
            visible=causal[None, start : start + rows],
        )
        for start in range(0, seq_len, rows)
    ]


def oracle_masks(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = case["layer0/keys"].shape[2]
    image_mask = torch.zeros(1, seq_len, dtype=torch.bool)
    image_mask[0, case["visual_indices"]] = True
    return torch.ones(1, seq_len, dtype=torch.bool), image_mask


def test_blocks_reproduce_the_reference_attention():
    case = oracle()
    for layer in range(4):
        blocks = oracle_blocks(case, layer)
        logits = torch.cat([b.logits.masked_fill(~b.visible[:, None], -torch.inf) for b in blocks], 2)
        probs = torch.softmax(logits, -1)
        torch.testing.assert_close(probs, case[f"layer{layer}/attention"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("entropy", "key"), [("prompt", "attention_entropy"), ("cross_modal", "crossmodal_entropy")]
)
def test_entropies_equal_the_released_code(entropy: str, key: str):
    case = oracle()
    key_mask, image_mask = oracle_masks(case)
    allocator = MEDAAllocator(entropy=entropy)
    for layer in range(4):
        ours = allocator.layer_statistic(oracle_blocks(case, layer), key_mask, image_mask)
        torch.testing.assert_close(ours, case[key][layer : layer + 1].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("entropy", "key"),
    [("attention_entropy", "layer_ratio"), ("crossmodal_entropy", "crossmodal_layer_ratio")],
)
def test_layer_ratios_equal_the_released_code(entropy: str, key: str):
    """The reference's ratio is ``clamp(w_l * L * rho, 0.01, 1)`` of the prompt with ``w = softmax(E)``."""
    case = oracle()
    weights = MEDAAllocator().layer_weights(case[entropy].double())
    torch.testing.assert_close((weights * 4 * RHO).clamp(0.01, 1.0), case[key].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(case["layer_hh_ratio"].double(), case["layer_ratio"].double() / 2)


def test_layer_budgets_hand_tables():
    """B = 8 of n = 40 tokens (rho = 0.2), 4 layers: 32 tokens per KV head to share.

    prompt entropy: 40 * ratio = [15.84, 8.88, 4.31, 2.97]: floors [15, 8, 4, 2] (29), the 3 tokens left to
    the largest remainders (.97, .88, .84) -> [16, 9, 4, 3].
    cross-modal: [23.71, 6.16, 1.51, 0.62]: layer 3 below one token is pinned at 1; the others share 31 by
    weight [.5927, .1541, .0378] -> [23.42, 6.09, 1.49] -> [23, 6, 1] + 1 token to the .49 -> [23, 6, 2, 1].
    min_ratio 0.1 (4 tokens): layers 2 and 3 pinned at 4; 24 shared by [.5927, .1541] -> [19.05, 4.95] ->
    [19, 4] + 1 to the .95 -> [19, 5, 4, 4].
    """
    case = oracle()
    n_tokens = torch.tensor([40])
    expected = [
        (MEDAAllocator(), "attention_entropy", [16, 9, 4, 3]),
        (MEDAAllocator.reference(), "attention_entropy", [16, 9, 4, 3]),  # 1% of 40 is under one token
        (MEDAAllocator(), "crossmodal_entropy", [23, 6, 2, 1]),
        (MEDAAllocator(min_ratio=0.1), "crossmodal_entropy", [19, 5, 4, 4]),
    ]
    for allocator, key, table in expected:
        allocator.bind(n_layers=4, n_heads=2, n_kv_heads=2)
        counts = allocator.allocate_layers(8, n_tokens, case[key][:, None])
        assert counts[:, 0, 0].tolist() == table, (allocator, key)
        assert counts[:, 0, 1].tolist() == table
    assert MEDAAllocator.reference() == MEDAAllocator(entropy="prompt", min_ratio=0.01)


def test_cross_modal_entropy_without_an_image_is_the_prompt_entropy():
    case = oracle()
    key_mask, _ = oracle_masks(case)
    no_image = torch.zeros_like(key_mask)
    blocks = oracle_blocks(case, 1)
    cross = MEDAAllocator(entropy="cross_modal").layer_statistic(blocks, key_mask, no_image)
    prompt = MEDAAllocator(entropy="prompt").layer_statistic(blocks, key_mask, no_image)
    torch.testing.assert_close(cross, prompt)
    with pytest.raises(ValueError, match="needs the positions of the image tokens"):
        MEDAAllocator().layer_statistic(blocks, key_mask, None)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"entropy": "crossmodal"}, ValueError, "entropy must be one of cross_modal, prompt"),
        ({"min_ratio": 1.5}, ValueError, "min_ratio must be in"),
        ({"min_ratio": "0.1"}, TypeError, "min_ratio must be a number"),
    ],
)
def test_bad_fields_are_refused_by_name(fields: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        make_allocator("meda", **fields)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3", "glm4v"])
def test_prompt_entropy_equals_the_models_own_attention(family: str):
    """``entropy="prompt"`` recomputed from the eager model's attention probabilities (M-RoPE, Gemma 3's
    bidirectional image blocks, GLM's pairwise partial rotary), per layer it allocates."""
    model, processor = tiny_sharpened(family, "eager")
    inputs = make_inputs(family, processor, [QUESTION])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    press = SnapKVPress(budget=8, window_size=4, allocator=MEDAAllocator(entropy="prompt"))
    with press(model), torch.no_grad():
        model(**inputs, use_cache=True)
    for ordinal, module in enumerate(get_adapter(model).attention_modules):
        statistic = float(press.stats.layer_statistics[ordinal, 0])
        if getattr(module, "sliding_window", None):
            assert math.isnan(statistic)
            continue
        probs = attentions[module.layer_idx][0].double()  # (heads, queries, keys)
        expected = -torch.special.xlogy(probs, probs).sum(-1).mean()
        assert statistic == pytest.approx(float(expected), rel=1e-4, abs=1e-6), (family, ordinal)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_shares_exactly_the_model_budget(family: str):
    """Under MEDA (cross-modal; text families fall back to the prompt entropy) every sample's compressed
    layers hold ``L * min(n, B)`` tokens per KV head; short prompts stay whole; generate runs."""
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"])
    budget = 8
    press = SnapKVPress(budget=budget, window_size=4, allocator=MEDAAllocator())
    tokens = greedy_under(press, model, inputs)
    if tokens is None:  # this release gives the family its own cache class: refused by name
        return
    assert tokens.shape[0] == 2
    statistics = press.stats.layer_statistics
    shared = [i for i in range(statistics.shape[0]) if not math.isnan(float(statistics[i, 0]))]
    assert shared and torch.isfinite(statistics[shared]).all()
    lengths = torch.tensor(press.stats.prompt_tokens)
    totals = press.stats.kept[shared].sum(0)  # (batch, kv_heads)
    assert torch.equal(totals, (len(shared) * lengths.clamp(max=budget))[:, None].expand_as(totals))
    short = lengths <= budget
    assert press.stats.kept[shared][:, short].eq(lengths[short][None, :, None]).all()
