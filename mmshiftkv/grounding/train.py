"""Train the grounding model from scratch on the CPU and save it with its processor.

    nice -n 10 python -m mmshiftkv.grounding.train            # writes mmshiftkv/grounding/checkpoint/

Every step draws a fresh batch from the synthetic stream (training seed != the evaluation seed) and
minimises the cross-entropy of the answer (after the lead-in ``ANSWER_PREFIX``) and the closing
``<|im_end|>``. Three aids make this fit in half an hour of one CPU core:

* a curriculum: images start with one item, up to six after ``ramp_steps``;
* a linear probe on the vision tower's tokens (symbol and colour of each cell), dropped afterwards;
* for a share of samples, the decoding positions see a randomly thinned prompt, as under a press
  (:func:`thinned_attention_mask`), so the model depends on the tokens that hold the answer rather
  than on whatever prompt tokens happen to be there.

The log's accuracy is teacher-forced exact match on each fresh batch before its update: a sample
counts when every target token is the argmax given the true prefix, which for a full-cache sample
is exactly when greedy generation would produce it. At the end the model is scored with greedy
generation on the fixed evaluation set (full cache), and ``training.json`` records the command,
time, seed and accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from mmshiftkv.grounding.data import (
    COLOURS,
    EVAL_SEED,
    KINDS,
    SYMBOLS,
    GridSpec,
    GroundingSample,
    make_dataset,
    make_sample,
)
from mmshiftkv.grounding.evaluate import evaluate
from mmshiftkv.grounding.model import ANSWER_PREFIX, CHECKPOINT_DIR, build_model, build_processor, prompt_text
from mmshiftkv.models.positions import rope_index

IGNORE = -100


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (the defaults produced the shipped checkpoint).

    Parameters
    ----------
    steps : int
        Optimiser steps, one fresh batch each.
    batch_size : int
        Samples per step.
    lr : float
        Peak AdamW learning rate, reached after ``warmup`` steps, then cosine decay to 0.
    warmup : int
        Linear warm-up steps.
    ramp_steps : int
        Curriculum: images start with a single item and the most items per image grows to the
        evaluation's maximum over these steps; after them the evaluation's geometry is used.
    thinned_share : float
        Share of samples trained as if a press had compressed their prompt: their decoding positions
        (the answer after its first token, which the prefill itself produces) see a random subset
        of the prompt (see :func:`thinned_attention_mask`). Trained on full caches only, a model this
        small leans on arbitrary prompt tokens while decoding: every press then failed even when it
        kept the answer's image tokens, so the benchmark could not tell good selections from bad.
    probe_weight : float
        Weight of the auxiliary loss of a linear probe that reads each image token's symbol and
        colour from the vision tower's output (0 disables it); the probe is dropped after training.
    weight_decay : float
        AdamW weight decay.
    seed : int
        Seed of the initial weights and of the training stream (must differ from ``EVAL_SEED``).
    eval_samples : int
        Size of the final greedy evaluation on the fixed set.
    threads : int
        torch CPU threads. One by default: on a busy shared machine two OpenMP threads spin on each
        other and run several times slower than one.
    log_every : int
        Steps between log lines.
    """

    steps: int = 3600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    ramp_steps: int = 600
    thinned_share: float = 0.3
    probe_weight: float = 1.0
    weight_decay: float = 0.01
    seed: int = 0
    eval_samples: int = 400
    threads: int = 1
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "threads", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.ramp_steps < 0 or self.eval_samples < 0:
            raise ValueError("warmup, ramp_steps and eval_samples must be >= 0")
        if not 0 <= self.thinned_share <= 1:
            raise ValueError(f"thinned_share must be in [0, 1], got {self.thinned_share}")
        if self.probe_weight < 0:
            raise ValueError(f"probe_weight must be >= 0, got {self.probe_weight}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.seed == EVAL_SEED:
            raise ValueError(f"seed {EVAL_SEED} is the evaluation stream's seed: train with another one")


def training_batch(processor: Qwen2_5_VLProcessor, samples: Sequence[GroundingSample]) -> dict:
    """Right-padded prompt + ``ANSWER_PREFIX`` + answer + ``<|im_end|>``, labels on all but the prompt.

    Returns
    -------
    dict
        The processor's tensors plus ``labels`` ``(batch, seq_len)``, ``IGNORE`` outside answers.
    """
    tokenizer = processor.tokenizer
    prompts = [prompt_text(processor, sample.question) for sample in samples]
    targets = [ANSWER_PREFIX + sample.answer + "<|im_end|>" for sample in samples]
    texts = [prompt + target for prompt, target in zip(prompts, targets)]
    tokenizer.padding_side = "right"
    inputs = dict(processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True))
    # The prompt's token count is the position where the answer starts (the image pads expand equally
    # in prompt and full text, so count them on the expanded full text instead of re-tokenising).
    answer_lengths = torch.tensor([len(tokenizer(target)["input_ids"]) for target in targets])
    lengths = inputs["attention_mask"].sum(-1)
    positions = torch.arange(inputs["input_ids"].shape[1])[None, :]
    is_answer = (positions >= (lengths - answer_lengths)[:, None]) & (positions < lengths[:, None])
    inputs["labels"] = inputs["input_ids"].masked_fill(~is_answer, IGNORE)
    return inputs


def thinned_attention_mask(
    batch: dict,
    samples: Sequence[GroundingSample],
    grid: GridSpec,
    image_token_id: int,
    share: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Causal attention mask in which some samples decode from a randomly thinned prompt.

    For a sample drawn with probability ``share``, every query from the first answer token on (the
    decoding steps) sees a prompt token with probability ``p``, itself uniform in [0, 1] per
    sample; the last prompt token and the image tokens of the items are always visible (every press
    keeps the former; without the latter the answer would be unknowable). Prompt queries keep the
    whole prompt, as in a real prefill.

    Parameters
    ----------
    batch : dict
        A right-padded :func:`training_batch`.
    samples, grid
        The batch's samples and their image geometry.
    image_token_id : int
        Id of ``<|image_pad|>``; its occurrences are the image tokens, cells row by row.
    share : float
        Probability that a sample is thinned.
    generator : torch.Generator
        Source of the random draws.

    Returns
    -------
    torch.Tensor
        ``(batch, 1, seq_len, seq_len)`` bool, True where a query may attend to a key.
    """
    input_ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    seq_len = input_ids.shape[1]
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None] & valid[:, None, :]
    prompt_lengths = (batch["labels"] != IGNORE).long().argmax(-1)
    thinned = torch.rand(len(samples), generator=generator) < share
    for index in thinned.nonzero().flatten().tolist():
        n = int(prompt_lengths[index])
        keep = torch.rand(n, generator=generator) < torch.rand(1, generator=generator)
        keep[n - 1] = True
        image_positions = (input_ids[index] == image_token_id).nonzero().flatten()
        for item in samples[index].items:
            keep[image_positions[item.row * grid.cols + item.col]] = True
        mask[index, n:, :n] &= keep
    return mask[:, None]


class CellProbe(nn.Module):
    """Linear read-out of every image token's symbol and colour (class 0: empty cell).

    A from-scratch VLM first answers from the question alone: the language model has no reason to
    look at image tokens that do not yet tell symbols apart, and the vision tower gets little
    gradient through an attention that ignores it. Supervising the image tokens directly makes them
    informative from the first steps (development runs without it were stopped early, so how much
    it shortens training is not measured).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_size, n) for n in (len(SYMBOLS) + 1, len(COLOURS) + 1))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropies; ``tokens`` ``(n_cells, hidden)``, ``targets`` ``(2, n_cells)``."""
        return sum(F.cross_entropy(head(tokens), target) for head, target in zip(self.heads, targets))


def cell_targets(samples: Sequence[GroundingSample], grid: GridSpec) -> torch.Tensor:
    """Symbol and colour class of every cell, ``(2, n_cells)``.

    Cells are listed image by image, row by row, as the vision tower outputs its merged tokens.
    """
    targets = torch.zeros(2, len(samples), grid.rows, grid.cols, dtype=torch.long)
    names = list(COLOURS)
    for index, sample in enumerate(samples):
        for item in sample.items:
            targets[0, index, item.row, item.col] = SYMBOLS.index(item.symbol) + 1
            targets[1, index, item.row, item.col] = names.index(item.colour) + 1
    return targets.flatten(1)


def teacher_forced_exact(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, whether every labelled token is the argmax of the previous position's logits.

    Parameters
    ----------
    logits : torch.Tensor
        ``(batch, seq_len, vocab)``.
    labels : torch.Tensor
        ``(batch, seq_len)`` with ``IGNORE`` where nothing is predicted.

    Returns
    -------
    torch.Tensor
        ``(batch,)`` bool.
    """
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    return ((predicted == target) | (target == IGNORE)).all(-1)


def curriculum_grid(config: TrainConfig, step: int) -> GridSpec:
    """The image geometry of ``step``: 1 item at first, the evaluation's range after the ramp."""
    final = GridSpec()
    if step >= config.ramp_steps:
        return final
    most = 1 + (final.max_items - 1) * step // config.ramp_steps
    return GridSpec(min_items=1, max_items=most)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``config.lr`` then cosine decay to 0 at ``config.steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: TrainConfig) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, dict]:
    """Train a fresh grounding model; returns it (eval mode), its processor and a log summary.

    Runs on ``config.threads`` torch threads and restores the caller's thread count afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, dict]:
    processor = build_processor()
    model = build_model(processor, seed=config.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    with torch.random.fork_rng(devices=[]):
        # Seeded like the model, so a run depends on the config alone.
        torch.manual_seed(config.seed)
        probe = CellProbe(model.config.text_config.hidden_size)
    optimizer.add_param_group({"params": list(probe.parameters()), "weight_decay": 0.0})
    image_tokens: list[torch.Tensor] = []
    # The vision tower's merged tokens, one row per image token, images in order, cells row by row.
    model.model.visual.register_forward_hook(
        lambda module, args, output: image_tokens.append(output.pooler_output)
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    window: dict[str, list[float]] = {kind: [] for kind in KINDS}
    losses: list[float] = []
    probe_losses: list[float] = []
    for step in range(config.steps):
        grid = curriculum_grid(config, step)
        samples = [
            make_sample(config.seed, step * config.batch_size + i, grid) for i in range(config.batch_size)
        ]
        batch = training_batch(processor, samples)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        image_tokens.clear()
        attention = thinned_attention_mask(
            batch, samples, grid, model.config.image_token_id, config.thinned_share, generator
        )
        # With a 4-D mask the model cannot derive the M-RoPE positions itself: give them.
        positions = rope_index(model, batch)
        output = model(**dict(batch, attention_mask=attention), position_ids=positions)
        probe_loss = probe(image_tokens[0], cell_targets(samples, grid))
        (output.loss + config.probe_weight * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        exact = teacher_forced_exact(output.logits.detach(), batch["labels"])
        for sample, hit in zip(samples, exact.tolist()):
            window[sample.kind].append(float(hit))
        losses.append(output.loss.item())
        probe_losses.append(probe_loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            per_kind = " ".join(f"{k}={sum(v) / max(1, len(v)):.2f}" for k, v in window.items())
            print(
                f"step {step + 1}/{config.steps}  {time.perf_counter() - start:6.0f}s  "
                f"loss {sum(losses) / len(losses):.4f}  probe {sum(probe_losses) / len(probe_losses):.3f}  "
                f"lr {learning_rate(config, step):.2e}  {per_kind}",
                flush=True,
            )
            window = {kind: [] for kind in KINDS}
            losses, probe_losses = [], []
    model.eval()
    return (
        model,
        processor,
        {
            "train_seconds": round(time.perf_counter() - start, 1),
            "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        },
    )


def main(argv: Sequence[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="folder for save_pretrained")
    args = vars(parser.parse_args(argv))
    out: Path = args.pop("out")
    config = TrainConfig(**args)

    start = time.perf_counter()
    model, processor, summary = train(config)
    result = evaluate(model, processor, make_dataset(config.eval_samples, seed=EVAL_SEED))
    print(json.dumps(result.as_dict(), indent=2))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "command": " ".join(
            ["python -m mmshiftkv.grounding.train", *(sys.argv[1:] if argv is None else argv)]
        ),
        "config": asdict(config),
        **summary,
        "total_seconds": round(time.perf_counter() - start, 1),
        # Other jobs share the machine: its load says how much of the time was ours.
        "load_average_1_5_15min": [round(load, 2) for load in os.getloadavg()],
        "eval_seed": EVAL_SEED,
        "eval_samples": config.eval_samples,
        "eval_accuracy": result.accuracy,
        "eval_accuracy_by_kind": result.by_kind,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
