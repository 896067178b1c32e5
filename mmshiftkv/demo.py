"""The README's main job: every press at a few budgets on one image + question.

Offline by default on an embedded tiny Qwen2.5-VL built in code (random weights: the text it
generates is noise, the compression facts are real). With ``--model <hub id or path>`` the same
runs on a real checkpoint, e.g. ``--model Qwen/Qwen2.5-VL-7B-Instruct --image doc.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import DynamicCache

from mmshiftkv.presses import PRESSES, BudgetedPress, FullKVPress

DEFAULT_QUESTION = "What is written in the picture?"


def demo_image() -> Image.Image:
    """A deterministic picture with text and coloured boxes."""
    from PIL import ImageDraw

    image = Image.new("RGB", (224, 112), "white")
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(["red", "green", "blue", "orange"]):
        draw.rectangle([8 + 54 * i, 8, 54 + 54 * i, 54], fill=colour)
        draw.text((24 + 54 * i, 24), "ABCD"[i], fill="white")
    draw.text((8, 70), "mmshiftkv demo 2026", fill="black")
    return image


def load(model_id: str | None, device: str):
    """The model and processor: the embedded tiny Qwen2.5-VL, or a real checkpoint."""
    if model_id is None:
        from mmshiftkv.models.tiny import build_tiny_model

        return build_tiny_model("qwen2.5-vl")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, device_map=device)
    return model.eval(), AutoProcessor.from_pretrained(model_id)


def build_inputs(processor, image: Image.Image, question: str, device) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return {k: v.to(device) for k, v in processor(images=[image], text=[text], return_tensors="pt").items()}


def image_token_count(model, inputs: dict) -> int:
    image_token = getattr(model.config, "image_token_id", None) or getattr(
        model.config, "image_token_index", None
    )
    return int((inputs["input_ids"] == image_token).sum()) if image_token is not None else 0


def run_one(model, processor, inputs: dict, press: BudgetedPress, max_new_tokens: int) -> dict:
    """Prefill + greedy decode under ``press``; the compression facts and the answer."""
    with press(model), torch.no_grad():
        output = model.generate(
            **inputs, past_key_values=DynamicCache(), max_new_tokens=max_new_tokens, do_sample=False
        )
    stats = press.stats
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
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
        "answer": answer,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmshiftkv demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF hub id or local path (default: embedded tiny Qwen2.5-VL)")
    parser.add_argument("--image", help="image file (default: a generated picture)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--presses", default=",".join(name for name in PRESSES if name != "full"))
    parser.add_argument("--budgets", default="8,16,32", help="tokens per KV head, comma separated")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)

    unknown = [name for name in args.presses.split(",") if name not in PRESSES]
    if unknown:
        parser.error(f"unknown press(es) {unknown}; choose from {', '.join(PRESSES)}")
    budgets = [int(b) for b in args.budgets.split(",")]
    model, processor = load(args.model, args.device)
    image = Image.open(args.image).convert("RGB") if args.image else demo_image()
    inputs = build_inputs(processor, image, args.question, model.device)
    n_prompt, n_image = inputs["input_ids"].shape[1], image_token_count(model, inputs)
    print(
        f"prompt: {n_prompt} tokens ({n_image} image, {n_prompt - n_image} text); question: {args.question!r}"
    )

    rows = [run_one(model, processor, inputs, FullKVPress(), args.max_new_tokens)]
    for name in args.presses.split(","):
        for budget in budgets:
            rows.append(run_one(model, processor, inputs, PRESSES[name](budget=budget), args.max_new_tokens))
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            kept = row["kept_per_head"]
            print(
                f"{row['press']:<24} budget={str(row['budget']):>4}  kept/head={kept['mean']:>6}"
                f"  KV {row['kv_bytes_before'] / 1024:8.1f} KiB -> {row['kv_bytes_after'] / 1024:8.1f} KiB"
                f"  answer={row['answer']!r}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
