"""Task definitions end to end on tiny local datasets in each benchmark's real schema.

Each test writes a few rows with the hub dataset's columns (PIL images included) to a local
parquet folder, loads it back through ``datasets.load_dataset`` exactly as the hub copy would be
loaded, and checks prompt building, post-processing, scoring and aggregation against values
worked out by hand from lmms-eval's task configs (commit 75571cfe).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from mmshiftkv.evaluation import tasks
from mmshiftkv.evaluation.metrics import OCRBENCH_CATEGORIES


def _image(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def _write_local_dataset(root: Path, split: str, columns: dict[str, list], features: dict[str, Any]) -> str:
    """Write rows as ``<root>/data/<split>-00000-of-00001.parquet`` (the hub layout)."""
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    (root / "data").mkdir(parents=True)
    dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return str(root)


def _load(task: tasks.TaskSpec, tmp_path: Path, limit: int | None = None) -> datasets.Dataset:
    return task.load(limit=limit, cache_dir=str(tmp_path / "cache"))


def _run(task: tasks.TaskSpec, rows: datasets.Dataset, generations: list[str]) -> list[dict]:
    records = [task.score(task.postprocess(text), row) for row, text in zip(rows, generations)]
    assert len(records) == len(rows)
    return records


STRINGS = datasets.Sequence(datasets.Value("string"))

# --------------------------------------------------------------------------------------------------
# DocVQA
# --------------------------------------------------------------------------------------------------


def test_docvqa_end_to_end(tmp_path: Path) -> None:
    root = _write_local_dataset(
        tmp_path / "docvqa",
        "validation",
        {
            "questionId": ["337", "338", "339"],
            "question": ["What is the date?", "Who signed the letter?", "What is the total?"],
            "question_types": [["layout"], ["handwritten"], ["table/list"]],
            "docId": [279, 280, 281],
            "ucsf_document_id": ["mxcj0037", "mxcj0038", "mxcj0039"],
            "ucsf_document_page_no": ["1", "2", "3"],
            "answers": [["March 5, 1998", "5 March 1998"], ["J. Smith"], ["$1,234"]],
            "data_split": ["val", "val", "val"],
            "image": [_image((255, 255, 255)), _image((0, 0, 0)), _image((10, 20, 30))],
        },
        {
            "questionId": datasets.Value("string"),
            "question": datasets.Value("string"),
            "question_types": STRINGS,
            "docId": datasets.Value("int64"),
            "ucsf_document_id": datasets.Value("string"),
            "ucsf_document_page_no": datasets.Value("string"),
            "answers": STRINGS,
            "data_split": datasets.Value("string"),
            "image": datasets.Image(),
        },
    )
    task = tasks.get_task("docvqa_val", dataset_id=root, dataset_config=None)
    rows = _load(task, tmp_path)
    assert len(rows) == 3

    row = rows[0]
    assert task.build_prompt(row) == "What is the date?\nAnswer the question using a single word or phrase."
    images = task.build_images(row)
    assert len(images) == 1 and images[0].mode == "RGB" and images[0].size == (24, 16)
    messages = task.build_messages(row)
    assert messages[0]["role"] == "user"
    assert [c["type"] for c in messages[0]["content"]] == ["image", "text"]
    assert messages[0]["content"][1]["text"] == task.build_prompt(row)

    records = _run(task, rows, ["5 march 1998\n\nThe letter is dated...", "J. Smyth", "1,234"])
    # row 0: equals the 2nd reference after lower-casing -> 1. row 1: one substitution in 8
    # characters -> 1 - 1/8 = 0.875. row 2: "$1,234" vs "1,234": 1 deletion in 6 -> 5/6.
    assert [r["score"] for r in records] == pytest.approx([1.0, 0.875, 5 / 6])
    result = task.aggregate(records)
    assert result["score"] == pytest.approx(100 * (1 + 0.875 + 5 / 6) / 3)
    assert result["num_samples"] == 3


# --------------------------------------------------------------------------------------------------
# OCRBench
# --------------------------------------------------------------------------------------------------


def test_ocrbench_end_to_end(tmp_path: Path) -> None:
    root = _write_local_dataset(
        tmp_path / "ocrbench",
        "test",
        {
            "dataset": ["IIIT5K", "HME100k", "HME100k", "docVQA"],
            "question": ["  what is written in the image?  ", "Write the expression.", "Write it.", "Date?"],
            "question_type": [
                "Regular Text Recognition",
                "Handwritten Mathematical Expression Recognition",
                "Handwritten Mathematical Expression Recognition",
                "Doc-oriented VQA",
            ],
            "answer": [["CITY"], ["x ^ { 2 }"], ["\\frac { a } { b }"], ["1998"]],
            "image": [_image((i * 40, 0, 0)) for i in range(4)],
        },
        {
            "dataset": datasets.Value("string"),
            "question": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "answer": STRINGS,
            "image": datasets.Image(),
        },
    )
    task = tasks.get_task("ocrbench", dataset_id=root)
    rows = _load(task, tmp_path)
    assert task.build_prompt(rows[0]) == "what is written in the image?"  # stripped, no pre/post prompt

    # row 0: "city" inside "the word is city" -> 1; row 1: spaces removed on both sides -> 1;
    # row 2: "\frac{a}{b}" vs "\Frac{a}{b}" is case-sensitive for HME100k -> 0; row 3: empty -> 0
    records = _run(task, rows, ["The word is city", "x^{2}", "\\Frac{a}{b}", ""])
    assert [r["score"] for r in records] == [1, 1, 0, 0]
    result = task.aggregate(records)
    assert result["score"] == 2  # a count, not a percentage
    assert result["num_samples"] == 4
    assert result["Regular Text Recognition"] == 1
    assert result["Handwritten Mathematical Expression Recognition"] == 1
    assert result["Doc-oriented VQA"] == 0
    assert set(OCRBENCH_CATEGORIES) <= set(result)


# --------------------------------------------------------------------------------------------------
# TextVQA
# --------------------------------------------------------------------------------------------------


def test_textvqa_end_to_end(tmp_path: Path) -> None:
    n = 2
    root = _write_local_dataset(
        tmp_path / "textvqa",
        "validation",
        {
            "image_id": ["0054c91397f2fe05", "005635e119b9f32f"],
            "question_id": [34602, 34603],
            "question": ["what brand is the BOTTLE?", "what number is on the jersey?"],
            "question_tokens": [["what", "brand"], ["what", "number"]],
            "image": [_image((0, 128, 0)), _image((0, 0, 128))],
            "image_width": [1024] * n,
            "image_height": [768] * n,
            "flickr_original_url": ["https://example.invalid/a.jpg"] * n,
            "flickr_300k_url": ["https://example.invalid/a_300.jpg"] * n,
            "answers": [
                ["Coke Zero", "coca-cola", "Coca Cola", "coke", "coca cola"]
                + ["cola", "coke", "coke", "pepsi", "x"],
                ["23"] * 2 + ["twenty three"] * 8,
            ],
            "image_classes": [["Bottle"], ["Person"]],
            "set_name": ["val"] * n,
            "ocr_tokens": [["COCA", "COLA"], ["23"]],
        },
        {
            "image_id": datasets.Value("string"),
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "question_tokens": STRINGS,
            "image": datasets.Image(),
            "image_width": datasets.Value("int64"),
            "image_height": datasets.Value("int64"),
            "flickr_original_url": datasets.Value("string"),
            "flickr_300k_url": datasets.Value("string"),
            "answers": STRINGS,
            "image_classes": STRINGS,
            "set_name": datasets.Value("string"),
            "ocr_tokens": STRINGS,
        },
    )
    task = tasks.get_task("textvqa_val", dataset_id=root)
    rows = _load(task, tmp_path)
    # str.capitalize: first letter up, the rest down ("BOTTLE" -> "bottle")
    assert task.build_prompt(rows[0]) == (
        "What brand is the bottle?\nAnswer the question using a single word or phrase."
    )
    with_ocr = tasks.get_task("textvqa_val", dataset_id=root, use_ocr_tokens=True)
    assert with_ocr.build_prompt(rows[0]) == (
        "What brand is the bottle?\nReference OCR token: COCA, COLA"
        "\nAnswer the question using a single word or phrase."
    )

    # stop string "ASSISTANT:" cuts the tail; "\n\n" is not a stop string for TextVQA
    assert task.postprocess(" Coca Cola. ASSISTANT: more") == "Coca Cola."
    records = _run(task, rows, ["The Coca-Cola ASSISTANT: x", "23"])
    # row 0: "the coca-cola" -> "coca cola" ('-' inside a word -> space, article dropped); it
    # matches "coca-cola", "Coca Cola", "coca cola" -> 3 of 10 humans -> 0.9.
    # row 1: "23" matches 2 humans -> 0.6 ("twenty three" is not a number word of the table)
    assert [r["score"] for r in records] == pytest.approx([0.9, 0.6])
    assert task.aggregate(records)["score"] == pytest.approx(75.0)


# --------------------------------------------------------------------------------------------------
# ChartQA
# --------------------------------------------------------------------------------------------------


def test_chartqa_end_to_end(tmp_path: Path) -> None:
    root = _write_local_dataset(
        tmp_path / "chartqa",
        "test",
        {
            "type": ["human_test", "human_test", "augmented_test", "augmented_test"],
            "question": ["What is the peak value?", "Which year is highest?", "Share of A?", "Color of bar?"],
            "answer": ["12.5", "2019", "45%", "Blue"],
            "image": [_image((i * 50, i * 50, 0)) for i in range(4)],
        },
        {
            "type": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
        },
    )
    task = tasks.get_task("chartqa", dataset_id=root)
    rows = _load(task, tmp_path)
    assert task.build_prompt(rows[0]) == "What is the peak value?\nAnswer the question with a single word."

    # 12 vs 12.5: 4% -> 1; "2018" vs 2019: 0.05% -> 1 (numeric tolerance applies to years too);
    # "45" vs "45%": 45 vs 0.45 -> 0; "blue" (cut at "\n\n") vs "Blue" -> 1
    records = _run(task, rows, ["12", "2018", "45", "blue\n\nbecause"])
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0, 1.0]
    result = task.aggregate(records)
    assert result["score"] == pytest.approx(75.0)
    assert result["human_split"] == pytest.approx(100.0)
    assert result["augmented_split"] == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------------
# TextCaps
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("java") is None or importlib.util.find_spec("pycocoevalcap") is None,
    reason="pycocoevalcap (the eval extra) and Java are needed",
)
def test_textcaps_end_to_end(tmp_path: Path) -> None:
    captions = [
        ["a red stop sign on a pole"] * 5,
        ["two cats sleeping near a laptop"] * 5,
    ]
    root = _write_local_dataset(
        tmp_path / "textcaps",
        "val",
        {
            "image_id": ["011e7e629fb9ae7b", "0a0b4ac3bb4e3e3c"],
            "image": [_image((200, 0, 0)), _image((0, 200, 0))],
            "caption_id": [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]],
            "caption_str": captions,
            "reference_strs": captions,
        },
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "caption_id": datasets.Sequence(datasets.Value("int64")),
            "caption_str": STRINGS,
            "reference_strs": STRINGS,
        },
    )
    task = tasks.get_task("textcaps_val", dataset_id=root)
    rows = _load(task, tmp_path)
    assert task.build_prompt(rows[0]) == "Provide a one-sentence caption for the provided image."
    records = _run(task, rows, ["A red stop sign on a pole.", "two cats sleeping near a laptop\n\nThe end"])
    assert all(r["score"] is None for r in records)
    # After PTB tokenisation each caption equals its (identical) references: same tf-idf vectors,
    # non-zero for n = 1..4 (each image has n-grams the other lacks), cosine 1, no length penalty
    # -> CIDEr-D 10 per image -> reported 10 x 100.
    result = task.aggregate(records)
    assert result["score"] == pytest.approx(1000.0)
    assert task.aggregate(records[::-1])["score"] == result["score"]


# --------------------------------------------------------------------------------------------------
# MMMU
# --------------------------------------------------------------------------------------------------


def _mmmu_dataset(tmp_path: Path) -> str:
    image_columns = {f"image_{i}": [None, None, None] for i in range(1, 8)}
    image_columns["image_1"] = [_image((1, 2, 3)), _image((4, 5, 6)), _image((7, 8, 9))]
    image_columns["image_2"] = [_image((9, 9, 9), (8, 8)), None, None]
    return _write_local_dataset(
        tmp_path / "mmmu",
        "validation",
        {
            "id": ["validation_Art_Theory_1", "validation_Physics_3", "validation_Math_7"],
            "question": [
                "<image 1> Which painting is shown?",
                "What is the speed in <image 1>?",
                "Compute the area in <image 1>.",
            ],
            "options": ["['Mona Lisa', 'The Scream', '<image 2>', 'Guernica']", "[]", "[]"],
            "explanation": ["", "", ""],
            **image_columns,
            "img_type": ["['Paintings']", "['Diagrams']", "['Diagrams']"],
            "answer": ["B", "12", "3.5"],
            "topic_difficulty": ["Easy", "Medium", "Hard"],
            "question_type": ["multiple-choice", "open", "open"],
            "subfield": ["Art History", "Mechanics", "Geometry"],
        },
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "options": datasets.Value("string"),
            "explanation": datasets.Value("string"),
            **{f"image_{i}": datasets.Image() for i in range(1, 8)},
            "img_type": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "topic_difficulty": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "subfield": datasets.Value("string"),
        },
    )


def test_mmmu_prompts_images_and_messages(tmp_path: Path) -> None:
    task = tasks.get_task("mmmu_val", dataset_id=_mmmu_dataset(tmp_path))
    rows = _load(task, tmp_path)

    mc = rows[0]
    assert task.build_prompt(mc) == (
        "<image 1> Which painting is shown?\n"
        "A. Mona Lisa\nB. The Scream\nC. <image 2>\nD. Guernica\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    images = task.build_images(mc)  # <image 1> in the question, <image 2> in an option
    assert [im.size for im in images] == [(24, 16), (8, 8)]
    content = task.build_messages(mc)[0]["content"]
    # split at the tags: "" | " Which painting ... C. " | "\nD. Guernica ..."; empty text dropped
    assert [c["type"] for c in content] == ["image", "text", "image", "text"]
    assert content[1]["text"] == "Which painting is shown?\nA. Mona Lisa\nB. The Scream\nC."
    assert content[3]["text"] == (
        "D. Guernica\n\nAnswer with the option's letter from the given choices directly."
    )

    open_row = rows[1]
    assert task.build_prompt(open_row) == (
        "What is the speed in <image 1>?\n\nAnswer the question using a single word or phrase."
    )
    assert len(task.build_images(open_row)) == 1


def test_mmmu_scoring_and_aggregation(tmp_path: Path) -> None:
    task = tasks.get_task("mmmu_val", dataset_id=_mmmu_dataset(tmp_path))
    rows = _load(task, tmp_path)
    generations = ["The answer is (B).", "The speed is 12 m/s", "the area is 3.6"]
    records = _run(task, rows, generations)
    # (B) == B; "12 m/s" yields the number 12 == 12; 3.6 != 3.5
    assert [r["score"] for r in records] == [1, 1, 0]
    assert [r["subject"] for r in records] == ["Art_Theory", "Physics", "Math"]
    result = task.aggregate(records)
    assert result["score"] == pytest.approx(100 / 1.5)
    assert result["Art and Design"] == pytest.approx(100.0)
    assert result["Science"] == pytest.approx(50.0)
    assert "Business" not in result

    # lmms-eval >= v0.4 scores every open question 0 (see MMMUTask's docstring)
    compat = tasks.get_task("mmmu_val", dataset_id=task.dataset_id, open_ended_scoring="lmms-eval")
    assert [r["score"] for r in _run(compat, rows, generations)] == [1, 0, 0]


def test_mmmu_random_fallback_is_seeded_per_question(tmp_path: Path) -> None:
    task = tasks.get_task("mmmu_val", dataset_id=_mmmu_dataset(tmp_path))
    row = _load(task, tmp_path)[0]
    draws = {tasks.get_task("mmmu_val", seed=s).score("I cannot tell", row)["score"] for s in range(40)}
    assert draws == {0, 1}  # the letter is drawn, so some seeds hit B and some do not
    first = tasks.get_task("mmmu_val", seed=7).score("I cannot tell", row)
    assert all(tasks.get_task("mmmu_val", seed=7).score("I cannot tell", row) == first for _ in range(3))


# --------------------------------------------------------------------------------------------------
# Registry, configuration, loading
# --------------------------------------------------------------------------------------------------


def test_registry_follows_lmms_eval_configs() -> None:
    # (dataset id, split, max_new_tokens) from lmms-eval 75571cfe's yaml files; TextVQA sets no
    # max_new_tokens there (model default) and gets 128 here.
    expected = {
        "docvqa_val": ("lmms-lab-encoder/DocVQA", "validation", 32),
        "ocrbench": ("echo840/OCRBench", "test", 128),
        "textvqa_val": ("lmms-lab-encoder/textvqa", "validation", 128),
        "chartqa": ("lmms-lab-encoder/ChartQA", "test", 16),
        "textcaps_val": ("lmms-lab-encoder/TextCaps", "val", 64),
        "mmmu_val": ("lmms-lab-encoder/MMMU", "validation", 128),
    }
    assert list(tasks.TASKS) == list(expected)
    for name, (dataset_id, split, max_new_tokens) in expected.items():
        task = tasks.get_task(name)
        assert (task.dataset_id, task.split, task.max_new_tokens) == (dataset_id, split, max_new_tokens)
    assert tasks.get_task("docvqa_val").dataset_config == "DocVQA"
    assert [tasks.TASKS[n].display_name for n in expected] == [
        "DocVQA",
        "OCRBench",
        "TextVQA",
        "ChartQA",
        "TextCaps",
        "MMMU",
    ]


def test_dataset_org_override() -> None:
    assert tasks.get_task("chartqa", dataset_org="lmms-lab").dataset_id == "lmms-lab/ChartQA"
    assert tasks.get_task("ocrbench", dataset_org="lmms-lab").dataset_id == "echo840/OCRBench"
    assert tasks.get_task("chartqa", dataset_org="lmms-lab", dataset_id="me/x").dataset_id == "me/x"


def test_postprocess_cuts_at_default_stop_string() -> None:
    task = tasks.get_task("docvqa_val")
    assert task.postprocess("  Paris \n\nExplanation: it is the capital") == "Paris"
    assert task.postprocess("") == ""


def test_limit_keeps_first_rows(tmp_path: Path) -> None:
    root = _write_local_dataset(
        tmp_path / "chartqa",
        "test",
        {
            "type": ["human_test"] * 3,
            "question": ["q0", "q1", "q2"],
            "answer": ["1", "2", "3"],
            "image": [_image((0, 0, 0))] * 3,
        },
        {
            "type": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
        },
    )
    rows = tasks.load_task_dataset(root, "test", limit=2, cache_dir=str(tmp_path / "cache"))
    assert rows["question"] == ["q0", "q1"]
    with pytest.raises(ValueError, match="limit"):
        tasks.load_task_dataset(root, "test", limit=0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_new_tokens": 0}, ValueError),
        ({"max_new_tokens": 2.5}, TypeError),
        ({"dataset_id": ""}, ValueError),
        ({"split": None}, TypeError),
        ({"stop_strings": "\n"}, TypeError),
        ({"stop_strings": ("",)}, ValueError),
        ({"post_prompt": None}, TypeError),
        ({"seed": "1"}, TypeError),
        ({"not_a_field": 1}, TypeError),
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        tasks.get_task("docvqa_val", **kwargs)


def test_unknown_task_and_bad_mmmu_option() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("vqav2")
    with pytest.raises(ValueError, match="open_ended_scoring"):
        tasks.get_task("mmmu_val", open_ended_scoring="lenient")
    with pytest.raises(TypeError, match="use_ocr_tokens"):
        tasks.get_task("textvqa_val", use_ocr_tokens="yes")


def test_aggregate_needs_records() -> None:
    with pytest.raises(ValueError, match="zero records"):
        tasks.get_task("docvqa_val").aggregate([])
