"""The synthetic grounding task, its training helpers and the shipped trained model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mmshiftkv.evaluation.calibrate import chunk_token_positions
from mmshiftkv.grounding.data import COLOURS, KINDS, GridSpec, GroundingSample, make_dataset, make_sample
from mmshiftkv.grounding.evaluate import evaluate, head_score_samples, prompt_batch
from mmshiftkv.grounding.model import (
    ANSWER_PREFIX,
    CHECKPOINT_DIR,
    build_model,
    build_processor,
    load_grounding_model,
)
from mmshiftkv.grounding.train import (
    IGNORE,
    TrainConfig,
    teacher_forced_exact,
    thinned_attention_mask,
    train,
    training_batch,
)
from mmshiftkv.presses import FullKVPress, SnapKVPress


def fingerprint(samples) -> list[tuple[bytes, str, str]]:
    return [(s.image.tobytes(), s.question, s.answer) for s in samples]


def test_generator_is_deterministic() -> None:
    assert fingerprint(make_dataset(12, seed=7)) == fingerprint(make_dataset(12, seed=7))
    assert fingerprint(make_dataset(4, seed=7, start=8)) == fingerprint(make_dataset(12, seed=7)[8:])
    other = fingerprint(make_dataset(12, seed=8))
    assert all(a != b for a, b in zip(fingerprint(make_dataset(12, seed=7)), other))


def expected_answer(question: str, items) -> str:
    """The answer recomputed from the item list and the question text alone."""
    if match := re.fullmatch(r"What is at row (\d), column (\d)\?", question):
        row, col = int(match[1]) - 1, int(match[2]) - 1
        return next(i.symbol for i in items if (i.row, i.col) == (row, col))
    if match := re.fullmatch(r"What is in the (\w+) box\?", question):
        (only,) = [i for i in items if i.colour == match[1]]
        return only.symbol
    if match := re.fullmatch(r"How many (\w+) boxes\?", question):
        return str(sum(i.colour == match[1] for i in items))
    assert question == "Read all items left to right."
    grid = {(i.row, i.col): i.symbol for i in items}
    return "".join(grid[r, c] for r in range(4) for c in range(4) if (r, c) in grid)


def test_answers_follow_from_the_items_and_every_kind_appears() -> None:
    samples = make_dataset(200, seed=3)
    assert {s.kind for s in samples} == set(KINDS)
    for sample in samples:
        assert sample.answer == expected_answer(sample.question, sample.items)
        assert 3 <= len(sample.items) <= 6
        assert len({i.symbol for i in sample.items}) == len(sample.items)
        assert len({(i.row, i.col) for i in sample.items}) == len(sample.items)


def test_items_are_drawn_in_their_cells() -> None:
    sample = make_sample(seed=5, index=0)
    pixels = np.asarray(sample.image)
    assert pixels.shape == (112, 112, 3)
    occupied = {(i.row, i.col): i for i in sample.items}
    for row in range(4):
        for col in range(4):
            # A pixel inside the box margin, away from the glyph in the middle.
            corner = tuple(pixels[row * 28 + 4, col * 28 + 4])
            want = COLOURS[occupied[row, col].colour] if (row, col) in occupied else (255, 255, 255)
            assert corner == want, (row, col)


def test_grid_spec_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="max_items"):
        GridSpec(rows=2, cols=2, max_items=5)
    with pytest.raises(ValueError, match="kind"):
        make_sample(0, 0, kind="caption")
    with pytest.raises(ValueError, match="evaluation"):
        TrainConfig(seed=1234)


def test_training_labels_cover_exactly_the_answer_and_end_token() -> None:
    processor = build_processor()
    samples = make_dataset(4, seed=0)
    batch = training_batch(processor, samples)
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE]
        assert processor.tokenizer.decode(labelled) == "Answer: " + sample.answer + "<|im_end|>"
        assert batch["attention_mask"][row, : len(batch["labels"][row])].sum() > len(labelled)


def test_thinned_mask_hides_prompt_tokens_from_decoding_positions_only() -> None:
    processor = build_processor()
    samples = make_dataset(6, seed=2)
    batch = training_batch(processor, samples)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    seq_len = batch["input_ids"].shape[1]
    generator = torch.Generator().manual_seed(0)
    full = thinned_attention_mask(batch, samples, GridSpec(), image_id, 0.0, generator)
    thinned = thinned_attention_mask(batch, samples, GridSpec(), image_id, 1.0, generator)
    assert full.shape == thinned.shape == (6, 1, seq_len, seq_len)
    hidden_somewhere = False
    for row, sample in enumerate(samples):
        length = int(batch["attention_mask"][row].sum())
        prompt = length - len(processor.tokenizer("Answer: " + sample.answer + "<|im_end|>")["input_ids"])
        for query in range(seq_len):
            for key in range(seq_len):
                assert bool(full[row, 0, query, key]) == (key <= query and key < length)
        # Prompt queries and decode-to-decode attention are untouched.
        assert torch.equal(thinned[row, 0, :prompt], full[row, 0, :prompt])
        assert torch.equal(thinned[row, 0, prompt:, prompt:], full[row, 0, prompt:, prompt:])
        seen = thinned[row, 0, prompt:, :prompt]
        assert (seen == seen[0]).all(), "every decoding step sees the same kept prompt"
        image_positions = (batch["input_ids"][row] == image_id).nonzero().flatten().tolist()
        must_keep = [prompt - 1] + [image_positions[i.row * 4 + i.col] for i in sample.items]
        assert seen[0, must_keep].all()
        hidden_somewhere |= not bool(seen[0].all())
    assert hidden_somewhere


def test_teacher_forced_exact_match() -> None:
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1], [IGNORE, IGNORE, 2, 0]])
    logits = torch.zeros(2, 4, 5)
    # Position t predicts label t + 1: sample 0 right at both answer tokens, sample 1 wrong at its last.
    logits[0, 1, 3] = logits[0, 2, 1] = 1.0
    logits[1, 1, 2] = logits[1, 2, 4] = 1.0
    assert teacher_forced_exact(logits, labels).tolist() == [True, False]


def test_training_is_reproducible_from_scratch() -> None:
    config = TrainConfig(steps=2, batch_size=4, warmup=1, ramp_steps=1, eval_samples=0, log_every=1)
    threads = torch.get_num_threads()
    first, _, _ = train(config)
    assert torch.get_num_threads() == threads
    second, _, _ = train(config)
    fresh = build_model(build_processor(), seed=config.seed)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    assert not torch.equal(first_state["lm_head.weight"], fresh.state_dict()["lm_head.weight"])


@pytest.fixture(scope="module")
def shipped():
    return load_grounding_model()


def test_shipped_checkpoint_is_small_and_records_its_training() -> None:
    assert (CHECKPOINT_DIR / "model.safetensors").stat().st_size < 5_000_000
    record = json.loads((CHECKPOINT_DIR / "training.json").read_text())
    assert record["command"].startswith("python -m mmshiftkv.grounding.train")
    assert record["eval_accuracy"] >= 0.95


def test_shipped_model_scores_95_percent_with_full_kv(shipped) -> None:
    model, processor = shipped
    result = evaluate(model, processor, make_dataset(50), press=FullKVPress())
    assert result.accuracy >= 0.95, result.by_kind


def test_press_compresses_the_grounding_prompt(shipped) -> None:
    model, processor = shipped
    press = SnapKVPress(budget=8)
    result = evaluate(model, processor, make_dataset(8), press=press)
    assert min(result.prompt_tokens) > 8
    assert int(press.stats.kept.max()) == 8


def test_head_score_chunks_are_the_items_image_tokens(shipped) -> None:
    model, processor = shipped
    for sample in head_score_samples(3, seed=77):
        question = GroundingSample(sample.image, "Read all items left to right.", "", "read")
        inputs = prompt_batch(processor, [question])
        image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        positions = chunk_token_positions(model, inputs, sample.image.size, sample.chunks)
        for chunk, found in zip(sample.chunks, positions):
            # The chunk box is one grid cell; cells are image tokens row by row.
            col, row = int(chunk.box[0]) // 28, int(chunk.box[1]) // 28
            assert found.tolist() == [int(image_positions[row * 4 + col])]
        assert not any(chunk.text in ANSWER_PREFIX for chunk in sample.chunks)
