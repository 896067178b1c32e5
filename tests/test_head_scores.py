"""SparseMM head-score files: the reference JSON format, its validation and shape checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmshiftkv.allocators import (
    SparseMMAllocator,
    check_head_score_shape,
    head_score_table,
    load_head_scores,
    save_head_scores,
)
from mmshiftkv.evaluation.calibrate import (
    OCR_PROMPT,
    TextChunk,
    chunk_token_positions,
    compute_visual_head_scores,
    render_ocr_sample,
    synthetic_ocr_samples,
)
from mmshiftkv.evaluation.calibrate import main as calibrate_main
from mmshiftkv.testing import build_tiny_model

# The layout of the reference files (CR400AF-A/SparseMM visual_head/head_score/llava-v1.6.json):
# one "layer-head" key per query head, one float per calibration image, indent 4.
REFERENCE_STYLE = """{
    "0-0": [
        0.0,
        0.0006077544977698808
    ],
    "0-1": [
        0.0,
        4.539432754840755e-05
    ],
    "1-0": [
        5.747126436781609e-06,
        0.001428733922160041
    ],
    "1-1": [
        0.0,
        0.025233694520350014
    ]
}"""


def test_load_reference_format(tmp_path):
    path = tmp_path / "llava-like.json"
    path.write_text(REFERENCE_STYLE)
    scores = load_head_scores(path)
    assert list(scores) == ["0-0", "0-1", "1-0", "1-1"]
    assert scores["1-0"] == [5.747126436781609e-06, 0.001428733922160041]
    table = head_score_table(scores)
    assert table.dtype == torch.float64 and table.shape == (2, 2)
    expected = [
        [0.0006077544977698808 / 2, 4.539432754840755e-05 / 2],
        [(5.747126436781609e-06 + 0.001428733922160041) / 2, 0.025233694520350014 / 2],
    ]
    assert torch.allclose(table, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_table_follows_keys_not_file_order():
    scores = load_head_scores({"1-1": [4.0], "0-1": [2.0], "1-0": [3.0], "0-0": [1.0, 3.0]})
    assert list(scores) == ["0-0", "0-1", "1-0", "1-1"]
    assert head_score_table(scores).tolist() == [[2.0, 2.0], [3.0, 4.0]]


def test_save_round_trip_from_mapping_and_tensor(tmp_path):
    per_image = torch.tensor([[[0.0, 0.5, 1.0]], [[0.25, 0.0, 2.0]]])  # (images=2, layers=1, heads=3)
    path = tmp_path / "from_tensor.json"
    save_head_scores(per_image, path)
    written = json.loads(path.read_text())
    assert written == {"0-0": [0.0, 0.25], "0-1": [0.5, 0.0], "0-2": [1.0, 2.0]}
    assert load_head_scores(path) == written

    again = tmp_path / "from_mapping.json"
    save_head_scores(written, again)
    assert again.read_text() == path.read_text()
    assert head_score_table(load_head_scores(again)).tolist() == [[0.125, 0.25, 1.5]]


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"0.0": [1.0]}, "not of the form"),
        ({"layer0-head0": [1.0]}, "not of the form"),
        ({"0-0": []}, "non-empty list"),
        ({"0-0": 1.0}, "non-empty list"),
        ({"0-0": "1.0"}, "non-empty list"),
        ({"0-0": [1.0, "x"]}, "list of floats"),
        ({"0-0": [1.0, None]}, "list of floats"),
        ({"0-0": [1.0, -0.5]}, "negative or non-finite"),
        ({"0-0": [float("nan")]}, "negative or non-finite"),
        ({"0-0": [float("inf")]}, "negative or non-finite"),
        ({"0-0": [1.0], "00-0": [2.0]}, "appears twice"),
        (
            {"0-0": [1.0], "0-1": [1.0], "1-0": [1.0]},
            r"full 2 layers x 2 heads grid: 1 missing, e.g. \['1-1'\]",
        ),
        ({}, "empty"),
    ],
)
def test_invalid_mappings_are_rejected(raw, match):
    with pytest.raises(ValueError, match=match):
        load_head_scores(raw)


def test_invalid_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"0-0": [NaN]}')
    with pytest.raises(ValueError, match="broken.json"):
        load_head_scores(path)
    path.write_text("[[0.1, 0.2]]")
    with pytest.raises(ValueError, match="JSON object"):
        load_head_scores(path)


def test_shape_mismatch_names_both_shapes():
    table = head_score_table(
        load_head_scores({f"{layer}-{head}": [1.0] for layer in range(32) for head in range(32)})
    )
    check_head_score_shape(table, 32, 32)
    with pytest.raises(
        ValueError, match=r"32 layers x 32 query heads, but the model has 28 layers x 28 query heads"
    ):
        check_head_score_shape(table, 28, 28)


def test_save_rejects_bad_tensor(tmp_path):
    with pytest.raises(ValueError, match="n_images, n_layers, n_heads"):
        save_head_scores(torch.ones(2, 3), tmp_path / "x.json")


# ---------------------------------------------------------------------------------------------
# Calibration (SparseMM visual-head procedure) on tiny random models and rendered-text images
# ---------------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": OCR_PROMPT}]}]


def processed(processor, image):
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


def test_rendered_boxes_hold_the_text():
    sample = render_ocr_sample(["apple", "river", "stone", "cloud", "green"], size=(160, 96), font_size=16)
    assert [chunk.text for chunk in sample.chunks] == ["apple", "river", "stone", "cloud", "green"]
    pixels = np.asarray(sample.image.convert("L"))
    outside = np.ones_like(pixels, dtype=bool)
    for chunk in sample.chunks:
        x0, y0, x1, y1 = (int(v) for v in chunk.box)
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 96
        assert pixels[y0:y1, x0:x1].min() < 128  # ink inside every box
        outside[y0:y1, x0:x1] = False
    assert pixels[outside].min() == 255  # and nowhere else
    samples = synthetic_ocr_samples(3, words_per_image=6, size=(448, 448), seed=1)
    assert len(samples) == 3 and all(len({c.text for c in s.chunks}) == 6 for s in samples)


def test_chunk_positions_qwen_grid():
    model, processor = build_tiny_model("qwen2.5-vl")
    # 112x112 -> 8x8 patches of 14 px -> 4x4 merged tokens of 28 px, row-major after <|vision_start|>.
    inputs = processed(processor, Image.new("RGB", (112, 112), "white"))
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert len(image) == 16
    chunks = [
        TextChunk("a", (0, 0, 27, 27)),
        TextChunk("b", (30, 60, 100, 80)),
        TextChunk("c", (0, 0, 112, 112)),
    ]
    positions = chunk_token_positions(model, inputs, (112, 112), chunks)
    assert positions[0].tolist() == [image[0].item()]
    assert positions[1].tolist() == image[[9, 10, 11]].tolist()  # row 2, columns 1..3
    assert positions[2].tolist() == image.tolist()
    # 112 wide x 56 high -> 2 rows x 4 columns; (60..80, 30..50) is row 1, column 2.
    inputs = processed(processor, Image.new("RGB", (112, 56), "white"))
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert len(image) == 8
    assert chunk_token_positions(model, inputs, (112, 56), [TextChunk("d", (60, 30, 80, 50))])[
        0
    ].tolist() == [image[6].item()]


def test_chunk_positions_llava_next_grid():
    model, processor = build_tiny_model("llava-next")
    # 56x56 with 28 px tiles of 2x2 features: 4 base tokens, then a 4x4 grid + one newline per row.
    inputs = processed(processor, Image.new("RGB", (56, 56), "white"))
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert len(image) == 4 + 4 * 5
    chunks = [TextChunk("a", (0, 0, 13, 13)), TextChunk("b", (20, 30, 50, 40))]
    positions = chunk_token_positions(model, inputs, (56, 56), chunks)
    assert positions[0].tolist() == [image[4].item()]
    assert positions[1].tolist() == image[[4 + 2 * 5 + 1, 4 + 2 * 5 + 2, 4 + 2 * 5 + 3]].tolist()


def test_calibration_rejects_unknown_layouts():
    model, processor = build_tiny_model("llava")
    inputs = processed(processor, Image.new("RGB", (56, 56), "white"))
    with pytest.raises(NotImplementedError, match="qwen2_5_vl and llava_next models, not llava"):
        chunk_token_positions(model, inputs, (56, 56), [TextChunk("a", (0, 0, 10, 10))])


def test_visual_head_scores_match_an_independent_recomputation(tmp_path):
    sample = render_ocr_sample(["apple", "river", "stone", "cloud"], size=(112, 112), font_size=14)
    reference_model, processor = build_tiny_model("qwen2.5-vl", attn_implementation="eager")
    inputs = processed(processor, sample.image)
    steps = 12
    out = reference_model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_attentions=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    pieces = [processor.tokenizer.decode([t]).strip() for t in tokens]
    assert pieces[:3] == ["f", "E", "?"]  # what this random model writes; the chunk labels below use it

    # Label the boxes after the fact (the labels are not part of the prompt): "f" is only in chunk A
    # (the whole image), "E" only in B (rows 0-1, columns 1-2), "?" in B and C (ambiguous: skipped).
    image = (inputs["input_ids"][0] == reference_model.config.image_token_id).nonzero().flatten().tolist()
    sample.chunks = [
        TextChunk("fig", (0, 0, 112, 112)),
        TextChunk("E?", (30, 0, 60, 50)),
        TextChunk("?!", (0, 84, 112, 112)),
    ]
    chunk_cells = {"f": image, "E": [image[i] for i in (1, 2, 5, 6)]}
    expected = {f"{layer}-{head}": [0.0] for layer in range(2) for head in range(4)}
    for step, piece in enumerate(pieces):
        if piece not in chunk_cells:
            continue
        cells = chunk_cells[piece]
        for layer in range(2):
            for head in range(4):
                if out.attentions[step][layer][0, head, -1].argmax().item() in cells:
                    expected[f"{layer}-{head}"][0] += 1 / len(cells)
    assert any(v[0] > 0 for v in expected.values())

    model, processor = build_tiny_model("qwen2.5-vl")  # same weights, SDPA: switched to eager inside
    path = tmp_path / "qwen-tiny.json"
    scores = compute_visual_head_scores(model, processor, [sample, sample], max_new_tokens=steps, path=path)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert scores == {key: value * 2 for key, value in expected.items()}
    assert load_head_scores(path) == scores

    allocator = SparseMMAllocator(head_scores=path, window=4)
    allocator.bind(n_layers=2, n_heads=4, n_kv_heads=2)
    assert allocator.allocate(16, 0, torch.tensor([100])).shape == (1, 2)


def test_calibration_command_writes_a_score_file(tmp_path):
    model, processor = build_tiny_model("qwen2.5-vl")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "scores.json"
    calibrate_main(
        [str(tmp_path / "model"), str(out), "--n-images", "2", "--max-new-tokens", "3", "--device", "cpu"]
    )
    scores = load_head_scores(out)
    assert head_score_table(scores).shape == (2, 4)
    assert all(len(values) == 2 for values in scores.values())


def test_calibration_command_reports_a_missing_model_in_one_line(tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert calibrate_main([str(missing), str(tmp_path / "scores.json"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mmshiftkv calibrate: error: cannot load the model '{missing}'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "scores.json").exists()
