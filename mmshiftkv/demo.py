"""The README's main job: every press at shrinking budgets, answering questions about one image.

Offline by default on the embedded grounding model (a small Qwen2.5-VL trained on synthetic
images of symbols in coloured boxes, shipped in ``mmshiftkv/grounding/checkpoint``): it is asked
four questions about one generated image (read a cell, read a colour, count a colour, read all
items), the expected answers are known, and the table shows which answers survive as the prompt
cache shrinks. With ``--model <hub id or path>`` the same runs on a real checkpoint, e.g.
``--model Qwen/Qwen2.5-VL-7B-Instruct --image doc.png --question "What is the title?"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from mmshiftkv.evaluation.runner import encode_messages, generate_answers
from mmshiftkv.grounding import ANSWER_PREFIX, EVAL_SEED, KINDS, load_grounding_model, make_sample
from mmshiftkv.presses import PRESSES, BudgetedPress, FullKVPress

DEFAULT_QUESTION = "What is written in the picture?"


@dataclass
class Question:
    """One image and question; ``expected`` is the exact answer when it is known."""

    image: Image.Image
    text: str
    expected: str | None = None


def demo_image() -> Image.Image:
    """A deterministic picture with text and coloured boxes (the default image of ``--model`` runs)."""
    image = Image.new("RGB", (224, 112), "white")
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(["red", "green", "blue", "orange"]):
        draw.rectangle([8 + 54 * i, 8, 54 + 54 * i, 54], fill=colour)
        draw.text((24 + 54 * i, 24), "ABCD"[i], fill="white")
    draw.text((8, 70), "mmshiftkv demo 2026", fill="black")
    return image


def grounding_questions(index: int) -> list[Question]:
    """One question of every kind about the same generated layout, the first at or after ``index``.

    A layout is usable when the four kinds' samples draw the same items (a "colour" question
    recolours an item when no colour is unique, which changes the image).
    """
    while True:
        samples = [make_sample(EVAL_SEED, index, kind=kind) for kind in KINDS]
        if all(sample.items == samples[0].items for sample in samples):
            return [Question(sample.image, sample.question, sample.answer) for sample in samples]
        index += 1


def load(model_id: str | None, device: str):
    """The model and processor: the embedded grounding model, or a real checkpoint."""
    if model_id is None:
        return load_grounding_model()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, device_map=device)
    return model.eval(), AutoProcessor.from_pretrained(model_id)


def image_token_count(model, inputs: dict) -> int:
    image_token = getattr(model.config, "image_token_id", None) or getattr(
        model.config, "image_token_index", None
    )
    return int((inputs["input_ids"] == image_token).sum()) if image_token is not None else 0


def run_one(model, processor, inputs: dict, press: BudgetedPress, max_new_tokens: int) -> dict:
    """Prefill + greedy decode of a batch under ``press``; the compression facts and the answers."""
    answers = [row["generated"] for row in generate_answers(model, processor, inputs, press, max_new_tokens)]
    stats = press.stats
    kept = stats.kept.float()
    return {
        "press": type(press).__name__,
        "budget": press.budget,
        "kept_per_head": {
            "min": int(kept.min()),
            "mean": round(float(kept.mean()), 1),
            "max": int(kept.max()),
        },
        "kv_bytes_before": stats.bytes_before,
        "kv_bytes_after": stats.bytes_after,
        "answers": answers,
    }


def mark(answer: str, expected: str | None, prefix: str) -> str:
    """The answer without the model's lead-in, with a check mark when ``expected`` is known."""
    shown = answer.removeprefix(prefix) if prefix else answer
    if expected is None:
        return repr(shown)
    return f"{shown!r}{' ok' if answer == prefix + expected else ' WRONG'}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmshiftkv demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF hub id or local path (default: the embedded grounding model)")
    parser.add_argument("--image", help="image file (with --model; default: a generated picture)")
    parser.add_argument("--question", help=f"question (with --model; default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--sample", type=int, default=0, help="which generated layout (embedded model)")
    parser.add_argument("--presses", default=",".join(name for name in PRESSES if name != "full"))
    parser.add_argument("--budgets", default="32,16,8,4", help="tokens per KV head, comma separated")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)

    unknown = [name for name in args.presses.split(",") if name not in PRESSES]
    if unknown:
        parser.error(f"unknown press(es) {unknown}; choose from {', '.join(PRESSES)}")
    if args.model is None and (args.image or args.question):
        parser.error("--image and --question need --model: the embedded model only knows its synthetic task")
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.model is None:
        questions, prefix = grounding_questions(args.sample), ANSWER_PREFIX
    else:
        image = Image.open(args.image).convert("RGB") if args.image else demo_image()
        questions, prefix = [Question(image, args.question or DEFAULT_QUESTION)], ""

    model, processor = load(args.model, args.device)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": q.image}, {"type": "text", "text": q.text}]}]
        for q in questions
    ]
    inputs = encode_messages(processor, conversations, model.device)
    n_image = image_token_count(model, inputs) // len(questions)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    print(f"{len(questions)} question(s) about one image ({n_image} image tokens), prompt tokens {lengths}:")
    for number, question in enumerate(questions, 1):
        expected = "" if question.expected is None else f"  (expected {question.expected!r})"
        print(f"  Q{number}: {question.text}{expected}")

    rows = [run_one(model, processor, inputs, FullKVPress(), args.max_new_tokens)]
    for name in args.presses.split(","):
        for budget in budgets:
            rows.append(run_one(model, processor, inputs, PRESSES[name](budget=budget), args.max_new_tokens))
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        answers = "  ".join(
            f"Q{n}={mark(answer, q.expected, prefix)}"
            for n, (answer, q) in enumerate(zip(row["answers"], questions), 1)
        )
        print(
            f"{row['press']:<24} budget={str(row['budget']):>4}  kept/head={row['kept_per_head']['mean']:>5}"
            f"  KV {row['kv_bytes_before'] / 1024:7.1f} -> {row['kv_bytes_after'] / 1024:7.1f} KiB  {answers}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
