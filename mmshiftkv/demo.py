"""Every press at shrinking budgets answering questions about one image, with the answers checked.

Offline by default on the embedded grounding model (a small Qwen2.5-VL trained on synthetic
images of symbols in coloured boxes, shipped in ``mmshiftkv/grounding/checkpoint``): it is asked
four questions about one generated image (read a cell, read a colour, count a colour, read all
items), the expected answers are known, and the table shows which answers survive as the prompt
cache shrinks. With ``--model <hub id or path>`` the same runs on a real checkpoint, e.g.
``--model Qwen/Qwen2.5-VL-7B-Instruct --image doc.png --question "What is the title?"``.

Each row is one press at one budget over the batch of questions: ``kept/head`` is the mean number
of prompt tokens a KV head keeps, ``img/head`` how many of them are image tokens, and ``KV/question``
the prompt cache of one question before and after compression (mean over the questions, padding
excluded; ``--json`` also gives the batch totals the press measured, padding included).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from mmshiftkv.generation import EvalSetupError, encode_messages, generate_answers, load_model, user_turn
from mmshiftkv.grounding import ANSWER_PREFIX, EVAL_SEED, KINDS, load_grounding_model, make_sample
from mmshiftkv.presses import BudgetedPress, SnapKVPress, StreamingLLMPress
from mmshiftkv.registry import FULL, PRESSES, make_press

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
    return load_model(model_id, "bfloat16" if device != "cpu" else "float32", device=device)


def image_token_mask(model, inputs: dict) -> torch.Tensor:
    """``(batch, seq_len)`` bool, True at the image tokens of the prompt."""
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(model.config, "image_token_index", None)
    if image_token is None:
        return torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    return inputs["input_ids"] == image_token


def kept_image_tokens(press: BudgetedPress, image_mask: torch.Tensor) -> torch.Tensor:
    """Image tokens each (layer, sample, KV head) kept under ``press``, ``(layers, batch, kv_heads)``."""
    stats = press.stats
    counts = torch.empty_like(stats.kept)
    image_mask = image_mask.cpu()
    for layer, indices in enumerate(stats.indices):
        if indices is None:  # layer left uncompressed: every image token stayed
            counts[layer] = image_mask.sum(-1, keepdim=True).expand_as(counts[layer])
            continue
        batch, heads, width = indices.shape
        valid = torch.arange(width) < stats.kept[layer][..., None]
        hits = image_mask.gather(1, indices.reshape(batch, -1)).reshape(batch, heads, width)
        counts[layer] = (hits & valid).sum(-1)
    return counts


def run_one(model, processor, inputs: dict, press: BudgetedPress, max_new_tokens: int) -> dict:
    """Prefill + greedy decode of a batch under ``press``; the compression facts and the answers.

    ``kv_bytes_*_per_sample`` count the real tokens of each sample (no padding); ``kv_bytes_*_batch``
    are the press's own totals over the batch, the left padding of the shorter prompts included.
    """
    answers = [row["generated"] for row in generate_answers(model, processor, inputs, press, max_new_tokens)]
    stats = press.stats
    layers, batch, heads = stats.kept.shape
    # bytes per (token, layer, KV head): keys + values, from the uncompressed batch's measured size
    token_bytes = stats.bytes_before // (batch * inputs["input_ids"].shape[1] * layers * heads)
    prompt = torch.tensor(stats.prompt_tokens)
    kept = stats.kept.float()
    return {
        "press": type(press).__name__,
        "budget": press.budget,
        "kept_per_head": {
            "min": int(kept.min()),
            "mean": round(float(kept.mean()), 1),
            "max": int(kept.max()),
        },
        "image_tokens_per_head": round(
            float(kept_image_tokens(press, image_token_mask(model, inputs)).float().mean()), 1
        ),
        "kv_bytes_before_per_sample": (prompt * layers * heads * token_bytes).tolist(),
        "kv_bytes_after_per_sample": (stats.kept.sum((0, 2)) * token_bytes).tolist(),
        "kv_bytes_before_batch": stats.bytes_before,
        "kv_bytes_after_batch": stats.bytes_after,
        "answers": answers,
    }


def strip_lead_in(answer: str, prefix: str) -> str:
    """``answer`` without the model's lead-in ``prefix`` and without leftovers of it.

    Under a tight budget the model may garble or repeat the lead-in (``"Answer: r: 6"``,
    ``"AnsweA"``): after the full ``prefix``, a leading piece of at least two characters of
    ``prefix`` is removed as well (the embedded model's answers are upper-case symbols and digits,
    which no such piece starts).
    """
    if not prefix:
        return answer
    answer = answer.removeprefix(prefix)
    for length in range(min(len(answer), len(prefix)), 1, -1):
        if answer[:length] in prefix:
            return answer[length:]
    return answer


def mark(answer: str, expected: str | None, prefix: str) -> str:
    """The answer without the model's lead-in, with a check mark when ``expected`` is known."""
    shown = strip_lead_in(answer, prefix)
    if expected is None:
        return repr(shown)
    return f"{shown!r}{' ok' if shown == expected else ' WRONG'}"


def why_it_fails(press: BudgetedPress, lengths: list[int]) -> str | None:
    """One line on why ``press`` kept no image token, for the presses whose design explains it."""
    span = f"{min(lengths)}-{max(lengths)}"
    if isinstance(press, SnapKVPress):
        return (
            f"SnapKV always keeps its observation window, the last {press.window_size} prompt tokens (the "
            f"question and chat template after the image); in {span}-token prompts a budget <= "
            f"{press.window_size} is all window, so no image token is kept (img/head 0)"
        )
    if isinstance(press, StreamingLLMPress):
        return (
            f"StreamingLLM keeps {press.n_sink} sink tokens and the most recent ones: the image sits "
            "between them, in the middle of the prompt, and is dropped first"
        )
    return None


def _budgets(value: str) -> list[int]:
    try:
        budgets = [int(b) for b in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if any(b < 1 for b in budgets):
        raise argparse.ArgumentTypeError(f"budgets are tokens per KV head, each >= 1, got {value!r}")
    return budgets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmshiftkv demo",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="HF hub id or local path (default: the embedded grounding model)")
    parser.add_argument("--image", help="image file (with --model; default: a generated picture)")
    parser.add_argument("--question", help=f"question (with --model; default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--sample", type=int, default=0, help="which generated layout (embedded model)")
    parser.add_argument(
        "--presses",
        default=",".join(name for name in PRESSES if name != FULL),
        help="comma list of presses to compare with FullKV (default: all): "
        + ", ".join(name for name in PRESSES if name != FULL),
    )
    parser.add_argument(
        "--budgets", type=_budgets, default="32,16,8,4", help="tokens per KV head, comma separated"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)

    names = args.presses.split(",")
    unknown = [name for name in names if name not in PRESSES]
    if unknown:
        parser.error(f"unknown press(es) {unknown}; choose from {', '.join(PRESSES)}")
    if args.model is None and (args.image or args.question):
        parser.error("--image and --question need --model: the embedded model only knows its synthetic task")
    if args.model is None:
        questions, prefix = grounding_questions(args.sample), ANSWER_PREFIX
    else:
        image = Image.open(args.image).convert("RGB") if args.image else demo_image()
        questions, prefix = [Question(image, args.question or DEFAULT_QUESTION)], ""

    try:
        model, processor = load(args.model, args.device)
    except EvalSetupError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    inputs = encode_messages(processor, [user_turn(q.text, image=q.image) for q in questions], model.device)
    n_image = int(image_token_mask(model, inputs).sum()) // len(questions)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    print(f"{len(questions)} question(s) about one image ({n_image} image tokens), prompt tokens {lengths}:")
    for number, question in enumerate(questions, 1):
        expected = "" if question.expected is None else f"  (expected {question.expected!r})"
        print(f"  Q{number}: {question.text}{expected}")
    if not args.json:
        print(
            "kept/head, img/head: prompt tokens / image tokens a KV head keeps (mean); KV/question: prompt "
            "cache of one question (mean, padding excluded); answers without the model's lead-in"
        )

    presses = [make_press(FULL)] + [
        make_press(name, budget=budget) for name in names for budget in args.budgets
    ]
    rows = [run_one(model, processor, inputs, press, args.max_new_tokens) for press in presses]
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        answers = "  ".join(
            f"Q{n}={mark(answer, q.expected, prefix)}"
            for n, (answer, q) in enumerate(zip(row["answers"], questions), 1)
        )
        before = sum(row["kv_bytes_before_per_sample"]) / len(questions) / 1024
        after = sum(row["kv_bytes_after_per_sample"]) / len(questions) / 1024
        print(
            f"{row['press']:<24} budget={str(row['budget']):>4}  kept/head={row['kept_per_head']['mean']:>5}"
            f"  img/head={row['image_tokens_per_head']:>5}  KV/question {before:6.1f} -> {after:6.1f} KiB"
            f"  {answers}"
        )
    if not args.json and n_image > 0:
        # one line per press that kept no image token at some budget, when its design explains it
        blind = {row["press"] for row in rows if row["image_tokens_per_head"] == 0}
        notes = {type(p).__name__: why_it_fails(p, lengths) for p in presses if type(p).__name__ in blind}
        for note in filter(None, notes.values()):
            print(f"why: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
