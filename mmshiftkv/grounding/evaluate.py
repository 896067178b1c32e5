"""Exact-match accuracy of the grounding model on synthetic questions, optionally under a press.

>>> model, processor = load_grounding_model()
>>> samples = make_dataset(200)
>>> evaluate(model, processor, samples, press=SnapKVPress(budget=8)).accuracy
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from mmshiftkv.evaluation.calibrate import OCRSample, TextChunk
from mmshiftkv.generation import encode_messages, generate_answers, user_turn
from mmshiftkv.grounding.data import KINDS, GridSpec, GroundingSample, make_sample
from mmshiftkv.grounding.model import ANSWER_PREFIX
from mmshiftkv.presses.base import BudgetedPress


@dataclass
class GroundingResult:
    """Accuracy of one model (and press) on one question set.

    Attributes
    ----------
    accuracy : float
        Fraction of exactly matched answers.
    by_kind : dict[str, float]
        The same per question kind.
    predictions : list[str]
        Generated texts (lead-in included), in sample order.
    prompt_tokens : list[int]
        Prompt length of every sample (the cache a press compresses).
    """

    accuracy: float
    by_kind: dict[str, float]
    predictions: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the predictions)."""
        return {
            "accuracy": self.accuracy,
            "by_kind": self.by_kind,
            "n": len(self.predictions),
            "mean_prompt_tokens": sum(self.prompt_tokens) / max(1, len(self.prompt_tokens)),
        }


def prompt_batch(
    processor: ProcessorMixin, samples: Sequence[GroundingSample], device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for ``samples`` (one image + question each), on ``device``."""
    return encode_messages(processor, [user_turn(s.question, image=s.image) for s in samples], device)


def answer_samples(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[GroundingSample],
    press: BudgetedPress | None = None,
    batch_size: int = 50,
    max_new_tokens: int = 16,
) -> tuple[list[str], list[int]]:
    """Greedy generations for ``samples`` (prompt compressed by ``press`` at prefill) and prompt lengths."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answers: list[str] = []
    lengths: list[int] = []
    for begin in range(0, len(samples), batch_size):
        inputs = prompt_batch(processor, samples[begin : begin + batch_size], model.device)
        answers += [
            row["generated"] for row in generate_answers(model, processor, inputs, press, max_new_tokens)
        ]
        lengths += inputs["attention_mask"].sum(-1).tolist()
    return answers, lengths


def evaluate(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[GroundingSample],
    press: BudgetedPress | None = None,
    batch_size: int = 50,
) -> GroundingResult:
    """Exact-match accuracy of greedy answers to ``samples`` under ``press`` (None: full cache).

    A generation is correct when it is exactly ``ANSWER_PREFIX + sample.answer`` then end of turn.

    Parameters
    ----------
    model, processor
        The grounding model and its processor (see :func:`~mmshiftkv.grounding.model.load_grounding_model`).
    samples : Sequence[GroundingSample]
        Questions with their exact answers, e.g. ``make_dataset(200)``.
    press : BudgetedPress, optional
        Applied around every ``generate`` call; its ``stats`` describe the last batch.
    batch_size : int, default=50
        Samples per left-padded generation batch.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    predictions, lengths = answer_samples(model, processor, samples, press, batch_size)
    hits = [prediction == ANSWER_PREFIX + sample.answer for prediction, sample in zip(predictions, samples)]
    by_kind = {}
    for kind in KINDS:
        kind_hits = [hit for hit, sample in zip(hits, samples) if sample.kind == kind]
        if kind_hits:
            by_kind[kind] = sum(kind_hits) / len(kind_hits)
    return GroundingResult(sum(hits) / len(hits), by_kind, predictions, lengths)


def head_score_samples(n: int, seed: int, grid: GridSpec | None = None) -> list[OCRSample]:
    """``n`` "read all items" images as SparseMM calibration samples, one text chunk per item.

    Feed them to :func:`~mmshiftkv.evaluation.calibrate.compute_visual_head_scores` with the
    prompt ``"Read all items left to right."``: each answer symbol then credits the heads whose
    top-1 attention falls on that item's image token. Layouts with a symbol that also occurs in
    ``ANSWER_PREFIX`` are skipped, since the lead-in's letters would be matched to that item.

    Parameters
    ----------
    n : int
        Number of samples.
    seed : int
        Stream of the layouts (use one that neither training nor evaluation uses).
    grid : GridSpec, optional
        Image geometry, default ``GridSpec()``.
    """
    grid = grid or GridSpec()
    samples: list[OCRSample] = []
    index = 0
    while len(samples) < n:
        sample = make_sample(seed, index, grid, kind="read")
        index += 1
        if any(item.symbol in ANSWER_PREFIX for item in sample.items):
            continue
        chunks = []
        for item in sample.items:
            x0, y0 = item.col * grid.cell, item.row * grid.cell
            chunks.append(TextChunk(item.symbol, (x0, y0, x0 + grid.cell - 1, y0 + grid.cell - 1)))
        samples.append(OCRSample(sample.image, chunks))
    return samples
