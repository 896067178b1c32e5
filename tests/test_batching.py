"""Batched compression: left-padded batches give, per sample, what the sample gives alone."""

from __future__ import annotations

import pytest
import torch

from mmshiftkv.presses import (
    ExpectedAttentionPress,
    KeyDiffPress,
    LastAttnPress,
    ShiftKVPress,
    SnapKVPress,
    StreamingLLMPress,
)
from mmshiftkv.testing import greedy, make_inputs, tiny

QUESTIONS = [
    "What is written in the picture, and which colour is the third box from the left?",
    "Read it.",
    "Which colour is the box at the top left corner?",
    "Count the boxes.",
]


def presses(budget: int):
    return [
        SnapKVPress(budget=budget, window_size=4),
        StreamingLLMPress(budget=budget),
        KeyDiffPress(budget=budget),
        ExpectedAttentionPress(budget=budget),
        LastAttnPress(budget=budget),
        ShiftKVPress(budget=budget, n_proxies=64, n_groups=8),
    ]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava-next", "llama"])
@pytest.mark.parametrize("batch", [2, 4])
def test_batched_generation_equals_one_by_one(family: str, batch: int):
    model, processor = tiny(family)
    questions = QUESTIONS[:batch]
    batched_inputs = make_inputs(family, processor, questions)
    lengths = batched_inputs["attention_mask"].sum(-1)
    # One budget below every prompt, one between the prompt lengths (short prompts stay whole).
    for budget in (10, int(lengths.min()) + 3):
        for press in presses(budget):
            with press(model):
                together = greedy(model, batched_inputs, max_new_tokens=4)
            for i, question in enumerate(questions):
                alone_inputs = make_inputs(family, processor, [question], image_seeds=[i])
                with press(model):
                    alone = greedy(model, alone_inputs, max_new_tokens=4)
                assert torch.equal(together[i, : alone.shape[1]], alone[0]), (type(press).__name__, budget, i)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava"])
def test_batched_head_wise_allocations_equal_one_by_one(family: str):
    from mmshiftkv.allocators import AdaAllocator, PyramidAllocator, SparseMMAllocator

    model, processor = tiny(family)
    questions = QUESTIONS[:3]
    batched_inputs = make_inputs(family, processor, questions)
    head_scores = {f"{layer}-{head}": [1.0 + layer + 3 * head] for layer in range(2) for head in range(4)}
    allocators = [
        PyramidAllocator(window=4),
        AdaAllocator(window=4),
        SparseMMAllocator(head_scores=head_scores, window=4),
    ]
    for allocator in allocators:
        for press in (
            ShiftKVPress(budget=14, allocator=allocator, n_proxies=64, n_groups=8),
            SnapKVPress(budget=14, allocator=allocator, window_size=4),
        ):
            with press(model):
                together = greedy(model, batched_inputs, max_new_tokens=4)
            kept_together = press.stats.kept
            for i, question in enumerate(questions):
                alone_inputs = make_inputs(family, processor, [question], image_seeds=[i])
                with press(model):
                    alone = greedy(model, alone_inputs, max_new_tokens=4)
                assert torch.equal(kept_together[:, i], press.stats.kept[:, 0])
                assert torch.equal(together[i, : alone.shape[1]], alone[0]), (type(allocator).__name__, i)
