"""Visual-head scores for SparseMM, computed for any supported VLM from OCR-style images.

(``mmshiftkv calibrate MODEL OUT.json --scores redundancy`` computes MixKV's redundancy scores on the
same images instead: :mod:`mmshiftkv.evaluation.redundancy`.)

The SparseMM procedure (Wang et al., 2025; reference ``visual_head/qwen_visual_head.py``): show
the model an image of rendered text chunks with known boxes, ask for the OCR, and decode
greedily. For every generated token whose text occurs in exactly one chunk, each (layer, query
head) whose top-1 attention (the attention of the query that produced the token) falls on one of
that chunk's image tokens earns ``1 / (number of image tokens of the chunk)``. A head's score for
an image is the sum over the generated tokens; the JSON file holds one score per image
(:mod:`mmshiftkv.allocators.head_scores` format), which
:class:`~mmshiftkv.allocators.SparseMMAllocator` reads (``mmshiftkv calibrate MODEL OUT.json``).

Differences from the reference, on purpose: a generated token is matched after stripping
whitespace (the reference's ``" word"`` never matches a chunk ``"word"``) and whitespace-only or
special tokens are skipped; a chunk's image tokens are the cells of the model's image-token grid
that its box overlaps, in original-image coordinates.

Supported layouts: Qwen2-VL / Qwen2.5-VL (merged patch grid, row-major) and LLaVA-NeXT (the
unpadded high-resolution grid with one newline token per row, after the base-image tokens; the
base-image tokens are not used, as in the reference).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from mmshiftkv.allocators.head_scores import save_head_scores
from mmshiftkv.cache.compat import cache_argument, returned_cache
from mmshiftkv.evaluation.redundancy import compute_redundancy_scores
from mmshiftkv.generation import EvalSetupError, encode_messages, load_model, user_turn
from mmshiftkv.models.adapter import get_adapter

OCR_PROMPT = "Provide all the OCR results of this image."

#: Words the synthetic calibration images are made of.
WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "purple",
    "window",
    "garden",
    "silver",
    "rocket",
    "candle",
    "market",
    "orange",
    "forest",
    "violin",
    "harbor",
    "pencil",
    "island",
    "jacket",
    "ladder",
    "marble",
    "needle",
    "oyster",
    "parrot",
    "quartz",
    "saddle",
    "tunnel",
    "velvet",
    "walnut",
    "yellow",
    "zipper",
    "bridge",
    "castle",
    "dragon",
    "engine",
    "falcon",
    "glacier",
    "hammer",
    "igloo",
    "jungle",
    "kettle",
    "lemon",
    "mirror",
    "nectar",
    "orbit",
    "pepper",
    "quiver",
    "rabbit",
    "sunset",
    "tiger",
    "umbrella",
    "valley",
    "wizard",
    "xenon",
    "yogurt",
    "zebra",
    "anchor",
    "basket",
    "copper",
    "desert",
    "eagle",
    "feather",
)


@dataclass
class TextChunk:
    """A piece of text rendered in a calibration image.

    Attributes
    ----------
    text : str
        The rendered text.
    box : tuple of float
        ``(x0, y0, x1, y1)`` in pixels of the original image.
    """

    text: str
    box: tuple[float, float, float, float]


@dataclass
class OCRSample:
    """One calibration image and the text chunks it shows."""

    image: Image.Image
    chunks: list[TextChunk]


def render_ocr_sample(
    words: Sequence[str], size: tuple[int, int] = (448, 448), font_size: int = 28, margin: int = 8
) -> OCRSample:
    """Render words left to right in lines, black on white; one chunk per word.

    Parameters
    ----------
    words : sequence of str
        Words to render; those that do not fit in the image are dropped.
    size : tuple of int, default=(448, 448)
        ``(width, height)`` of the image.
    font_size : int, default=28
        Size of Pillow's built-in font.
    margin : int, default=8
        Space around and between words, in pixels.
    """
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    chunks: list[TextChunk] = []
    x, y, line_height = margin, margin, 0
    for word in words:
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        width, height = right - left, bottom - top
        if x + width + margin > size[0]:
            x, y, line_height = margin, y + line_height + margin, 0
        if y + height + margin > size[1]:
            break
        draw.text((x - left, y - top), word, fill="black", font=font)
        chunks.append(TextChunk(word, (float(x), float(y), float(x + width), float(y + height))))
        x, line_height = x + width + 2 * margin, max(line_height, height)
    return OCRSample(image, chunks)


def synthetic_ocr_samples(
    n_samples: int, words_per_image: int = 12, size: tuple[int, int] = (448, 448), seed: int = 0
) -> list[OCRSample]:
    """``n_samples`` images of distinct random words from :data:`WORDS` (reproducible by ``seed``)."""
    rng = random.Random(seed)
    return [render_ocr_sample(rng.sample(WORDS, words_per_image), size=size) for _ in range(n_samples)]


def chunk_token_positions(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    image_size: tuple[int, int],
    chunks: Sequence[TextChunk],
) -> list[torch.Tensor]:
    """Positions in ``inputs["input_ids"]`` of the image tokens each chunk's box overlaps.

    Parameters
    ----------
    model : nn.Module
        A Qwen2-VL, Qwen2.5-VL or LLaVA-NeXT model.
    inputs : dict
        Processor output for one prompt with one image (batch size 1).
    image_size : tuple of int
        ``(width, height)`` of the original image, the coordinates of the chunk boxes.
    chunks : sequence of TextChunk
        The chunks.

    Returns
    -------
    list of torch.Tensor
        One int64 tensor of sorted positions per chunk.
    """
    config = model.config
    family = config.model_type  # the checkpoint's model type decides the image-token layout
    image_positions = (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        _, height, width = inputs["image_grid_thw"][0].tolist()
        merge = config.vision_config.spatial_merge_size
        rows, cols, first, stride = height // merge, width // merge, 0, width // merge
        expected = rows * cols
    elif family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        original = inputs["image_sizes"][0].tolist()
        grid_h, grid_w = get_anyres_image_grid_shape(original, config.image_grid_pinpoints, vision.image_size)
        rows, cols = unpad_image(torch.empty(1, grid_h * side, grid_w * side), original).shape[1:]
        first, stride = side * side, cols + 1
        expected = first + rows * stride
    else:
        raise NotImplementedError(
            f"visual-head calibration knows the image-token layout of qwen2_vl, qwen2_5_vl and llava_next "
            f"models, not {family}"
        )
    if len(image_positions) != expected:
        raise NotImplementedError(
            f"{family}: found {len(image_positions)} image tokens, expected {expected} from the image layout "
            f"(one image per prompt is supported)"
        )

    width_px, height_px = image_size
    positions = []
    for chunk in chunks:
        x0, y0, x1, y1 = chunk.box
        c0, c1 = (min(cols - 1, max(0, int(x * cols // width_px))) for x in (x0, x1))
        r0, r1 = (min(rows - 1, max(0, int(y * rows // height_px))) for y in (y0, y1))
        cells = [first + r * stride + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
        positions.append(
            image_positions[torch.tensor(cells, dtype=torch.long, device=image_positions.device)]
        )
    return positions


@torch.no_grad()
def compute_visual_head_scores(
    model: nn.Module,
    processor: Any,
    samples: Sequence[OCRSample],
    prompt: str = OCR_PROMPT,
    max_new_tokens: int = 256,
    path: str | None = None,
) -> dict[str, list[float]]:
    """Per-image visual-head scores of every (layer, query head), the SparseMM procedure.

    The language model runs with eager attention during the call (to read attention weights);
    its previous attention implementation is restored afterwards. Batch size is 1 and the prefill
    materializes every layer's ``(heads, T, T)`` attention once per image: budget GPU memory for it.

    Parameters
    ----------
    model : nn.Module
        A Qwen2-VL, Qwen2.5-VL or LLaVA-NeXT model.
    processor : Any
        Its processor (with a chat template).
    samples : sequence of OCRSample
        Calibration images with their chunk boxes, e.g. :func:`synthetic_ocr_samples`.
    prompt : str, default=OCR_PROMPT
        The user request shown after the image.
    max_new_tokens : int, default=256
        Greedy decoding length per image (stops earlier at an end-of-sequence token).
    path : str, optional
        Also write the scores there (JSON, :func:`~mmshiftkv.allocators.head_scores.save_head_scores`).

    Returns
    -------
    dict[str, list[float]]
        ``"layer-head"`` -> one score per sample, the SparseMM head-score format.
    """
    adapter = get_adapter(model)
    language_model = adapter.language_model
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    try:
        per_sample = torch.stack(
            [_score_sample(model, processor, sample, prompt, max_new_tokens) for sample in samples]
        )
    finally:
        language_model.set_attn_implementation(previous)
    scores = {
        f"{layer}-{head}": per_sample[:, layer, head].tolist()
        for layer in range(adapter.n_layers)
        for head in range(adapter.n_heads)
    }
    if path is not None:
        save_head_scores(scores, path)
    return scores


def _score_sample(
    model: nn.Module, processor: Any, sample: OCRSample, prompt: str, max_new_tokens: int
) -> torch.Tensor:
    """``(n_layers, n_heads)`` float64 scores of one sample."""
    adapter = get_adapter(model)
    tokenizer = processor.tokenizer
    inputs = encode_messages(processor, [user_turn(prompt, image=sample.image)], model.device)
    chunk_positions = chunk_token_positions(model, inputs, sample.image.size, sample.chunks)

    eos = model.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
    scores = torch.zeros(adapter.n_layers, adapter.n_heads, dtype=torch.float64)
    outputs = model(**inputs, use_cache=True, output_attentions=True)
    for _ in range(max_new_tokens):
        token = outputs.logits[0, -1].argmax()
        if token.item() in eos_ids:
            break
        piece = tokenizer.decode([token.item()], skip_special_tokens=True).strip()
        matches = [i for i, chunk in enumerate(sample.chunks) if piece and piece in chunk.text]
        if len(matches) == 1:
            positions = chunk_positions[matches[0]]
            for layer, attention in enumerate(outputs.attentions):
                top1 = attention[0, :, -1].argmax(-1)
                scores[layer] += torch.isin(top1, positions).double().cpu() / len(positions)
        outputs = model(
            input_ids=token.view(1, 1),
            **cache_argument(model, returned_cache(outputs)),
            use_cache=True,
            output_attentions=True,
        )
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: compute a head-score (or redundancy) file for a local model directory."""
    parser = argparse.ArgumentParser(
        prog="mmshiftkv calibrate",
        description="Compute SparseMM visual-head scores (or MixKV redundancy scores) on synthetic OCR "
        "images and write them as JSON.",
    )
    parser.add_argument("model", help="local model directory (or hub id when online)")
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument(
        "--scores",
        choices=("visual-heads", "redundancy"),
        default="visual-heads",
        help="visual-heads: SparseMM head scores (SparseMMAllocator); redundancy: MixKV's per-(layer, "
        "KV head) key/value redundancy (MixKVPress(redundancy=...)); --max-new-tokens does not apply",
    )
    parser.add_argument("--n-images", type=int, default=100)
    parser.add_argument("--words-per-image", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    # one-line errors for an unreachable hub, no weight-loading progress bar
    try:
        model, processor = load_model(args.model, "auto", device=args.device)
    except EvalSetupError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    samples = synthetic_ocr_samples(args.n_images, args.words_per_image, seed=args.seed)
    if args.scores == "redundancy":
        conversations = [user_turn(OCR_PROMPT, image=sample.image) for sample in samples]
        compute_redundancy_scores(model, processor, conversations, path=args.output)
        return 0
    compute_visual_head_scores(
        model, processor, samples, max_new_tokens=args.max_new_tokens, path=args.output
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
