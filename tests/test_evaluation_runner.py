"""The evaluation runner's parts: run planning, prediction files, resume, sharding, merging, tables.

End-to-end runs of the command line (every task, interruption + resume, two processes) are in
``tests/test_cli.py``; the tiny local datasets they use are built here, in each hub dataset's
schema (see ``tests/test_tasks.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmshiftkv import generation
from mmshiftkv.evaluation import report, runner
from mmshiftkv.evaluation.config import EvalConfig, RunSpec, build_tasks, plan_runs
from mmshiftkv.evaluation.store import OutputDirBusyError, PredictionStore, merge_fingerprint, merge_results

STRINGS = datasets.Sequence(datasets.Value("string"))
TEXT = datasets.Value("string")
INT = datasets.Value("int64")

# --------------------------------------------------------------------------------------------------
# Tiny local datasets of every task, in the hub schema
# --------------------------------------------------------------------------------------------------


def _image(i: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))


def task_rows(n: int) -> dict[str, tuple[str, dict, dict]]:
    """Per task: split, columns and features of ``n`` rows in the hub schema."""
    r = range(n)
    mmmu_images = {f"image_{k}": [_image(i) if k == 1 else None for i in r] for k in range(1, 8)}
    mmmu_images["image_2"] = [_image(i + 50, (20, 20)) if i % 2 == 0 else None for i in r]
    return {
        "docvqa_val": (
            "validation",
            {
                "questionId": [str(100 + i) for i in r],
                "question": [f"What is the total on page {i}?" for i in r],
                "question_types": [["table/list"] for _ in r],
                "docId": [i for i in r],
                "ucsf_document_id": [f"doc{i}" for i in r],
                "ucsf_document_page_no": ["1" for _ in r],
                "answers": [[f"{i}00", f"${i}00"] for i in r],
                "data_split": ["val" for _ in r],
                "image": [_image(i) for i in r],
            },
            {
                "questionId": TEXT,
                "question": TEXT,
                "question_types": STRINGS,
                "docId": INT,
                "ucsf_document_id": TEXT,
                "ucsf_document_page_no": TEXT,
                "answers": STRINGS,
                "data_split": TEXT,
                "image": datasets.Image(),
            },
        ),
        "ocrbench": (
            "test",
            {
                "dataset": ["IIIT5K" if i % 2 else "HME100k" for i in r],
                "question": ["What is written in the image?" for _ in r],
                "question_type": [
                    "Regular Text Recognition" if i % 2 else "Handwritten Mathematical Expression Recognition"
                    for i in r
                ],
                "answer": [["CITY"] if i % 2 else ["x ^ { 2 }"] for i in r],
                "image": [_image(i + 1) for i in r],
            },
            {
                "dataset": TEXT,
                "question": TEXT,
                "question_type": TEXT,
                "answer": STRINGS,
                "image": datasets.Image(),
            },
        ),
        "textvqa_val": (
            "validation",
            {
                "image_id": [f"img{i}" for i in r],
                "question_id": [30000 + i for i in r],
                "question": ["what brand is the bottle?" for _ in r],
                "question_tokens": [["what", "brand"] for _ in r],
                "image": [_image(i + 2) for i in r],
                "image_width": [40 for _ in r],
                "image_height": [30 for _ in r],
                "flickr_original_url": ["https://example.invalid/a.jpg" for _ in r],
                "flickr_300k_url": ["https://example.invalid/b.jpg" for _ in r],
                "answers": [["coke"] * 5 + ["pepsi"] * 5 for _ in r],
                "image_classes": [["Bottle"] for _ in r],
                "set_name": ["val" for _ in r],
                "ocr_tokens": [["COKE"] for _ in r],
            },
            {
                "image_id": TEXT,
                "question_id": INT,
                "question": TEXT,
                "question_tokens": STRINGS,
                "image": datasets.Image(),
                "image_width": INT,
                "image_height": INT,
                "flickr_original_url": TEXT,
                "flickr_300k_url": TEXT,
                "answers": STRINGS,
                "image_classes": STRINGS,
                "set_name": TEXT,
                "ocr_tokens": STRINGS,
            },
        ),
        "chartqa": (
            "test",
            {
                "type": ["human_test" if i % 2 else "augmented_test" for i in r],
                "question": [f"What is the value of bar {i}?" for i in r],
                "answer": [str(10 * i + 5) for i in r],
                "image": [_image(i + 3) for i in r],
            },
            {"type": TEXT, "question": TEXT, "answer": TEXT, "image": datasets.Image()},
        ),
        "textcaps_val": (
            "val",
            {
                "image_id": [f"cap{i}" for i in r],
                "image": [_image(i + 4) for i in r],
                "caption_id": [[5 * i + k for k in range(5)] for i in r],
                "caption_str": [[f"a sign that says number {i}"] * 5 for i in r],
                "reference_strs": [[f"a sign that says number {i}"] * 5 for i in r],
            },
            {
                "image_id": TEXT,
                "image": datasets.Image(),
                "caption_id": datasets.Sequence(INT),
                "caption_str": STRINGS,
                "reference_strs": STRINGS,
            },
        ),
        "mmmu_val": (
            "validation",
            {
                "id": [f"validation_{'Physics' if i % 2 else 'Art_Theory'}_{i}" for i in r],
                "question": [
                    "<image 1> Which option matches?" if i % 2 == 0 else "What is the speed in <image 1>?"
                    for i in r
                ],
                "options": ["['red', '<image 2>', 'blue', 'green']" if i % 2 == 0 else "[]" for i in r],
                "explanation": ["" for _ in r],
                **mmmu_images,
                "img_type": ["['Diagrams']" for _ in r],
                "answer": ["B" if i % 2 == 0 else "12" for i in r],
                "topic_difficulty": ["Easy" for _ in r],
                "question_type": ["multiple-choice" if i % 2 == 0 else "open" for i in r],
                "subfield": ["Mechanics" for _ in r],
            },
            {
                "id": TEXT,
                "question": TEXT,
                "options": TEXT,
                "explanation": TEXT,
                **{f"image_{k}": datasets.Image() for k in range(1, 8)},
                "img_type": TEXT,
                "answer": TEXT,
                "topic_difficulty": TEXT,
                "question_type": TEXT,
                "subfield": TEXT,
            },
        ),
    }


def write_task_datasets(
    root: Path, n: int = 3, tasks: list[str] | None = None, overrides: dict[str, dict] | None = None
) -> dict[str, str]:
    """Write ``n`` rows of each task as ``<root>/<task>/data/<split>-00000-of-00001.parquet``
    (the hub layout), with ``overrides[task]`` replacing columns; returns task -> folder."""
    folders = {}
    for task, (split, columns, features) in task_rows(n).items():
        if tasks is not None and task not in tasks:
            continue
        columns = {**columns, **(overrides or {}).get(task, {})}
        folder = root / task
        (folder / "data").mkdir(parents=True)
        dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
        folders[task] = str(folder)
    return folders


def textcaps_available() -> bool:
    import importlib.util

    return shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None


# --------------------------------------------------------------------------------------------------
# Configuration and run planning
# --------------------------------------------------------------------------------------------------


def test_plan_runs_full_once_then_press_x_allocator_x_budget() -> None:
    config = EvalConfig(
        model="m",
        tasks=("chartqa", "ocrbench"),
        presses=("full", "shiftkv", "snapkv"),
        budgets=(64, 128),
        allocators=("uniform", "pyramid"),
    )
    runs = plan_runs(config)
    per_task = [RunSpec("chartqa", "full")] + [
        RunSpec("chartqa", p, a, b)
        for p in ("shiftkv", "snapkv")
        for a in ("uniform", "pyramid")
        for b in (64, 128)
    ]
    assert runs[:9] == per_task
    assert [r.task for r in runs] == ["chartqa"] * 9 + ["ocrbench"] * 9
    assert runs[0].key == "full" and runs[1].key == "shiftkv__uniform__64"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tasks": ("vqav2",)}, "unknown tasks"),
        ({"presses": ("h2o",)}, "unknown presses"),
        ({"allocators": ("sparsemm",)}, "head_scores"),
        ({"budgets": (0,)}, "budget"),
        ({"budgets": (16, 16)}, r"budgets has duplicates: \[16, 16\]"),
        ({"allocators": ("pyramid",), "budgets": (64, 32)}, r"'pyramid'.*budget \(32\) must be larger"),
        ({"allocators": ("ada",), "budgets": (8,), "allocator_window": 8}, "allocator-window"),
        ({"batch_size": 0}, "batch_size"),
        ({"presses": ("full", "full")}, "duplicates"),
        ({"dataset_ids": {"vqav2": "x"}}, "unknown tasks"),
        ({"dtype": "int8"}, "dtype"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EvalConfig(**{"model": "m", **kwargs})


def test_build_tasks_applies_overrides() -> None:
    config = EvalConfig(
        model="m",
        tasks=("docvqa_val", "mmmu_val", "ocrbench"),
        dataset_org="lmms-lab",
        dataset_ids={"ocrbench": "/data/ocr"},
        dataset_configs={"docvqa_val": None},
        max_new_tokens=64,
        seed=7,
        mmmu_open_scoring="lmms-eval",
    )
    tasks = build_tasks(config)
    assert tasks["docvqa_val"].dataset_id == "lmms-lab/DocVQA"
    assert tasks["docvqa_val"].dataset_config is None
    assert tasks["ocrbench"].dataset_id == "/data/ocr"
    assert tasks["mmmu_val"].open_ended_scoring == "lmms-eval"
    assert {t.max_new_tokens for t in tasks.values()} == {64}
    assert {t.seed for t in tasks.values()} == {7}


# --------------------------------------------------------------------------------------------------
# Prediction files: resume and sharding
# --------------------------------------------------------------------------------------------------


def _line(index: int, prediction: str) -> dict:
    return {"index": index, "prediction": prediction, "prompt_tokens": 9, "kept_tokens": 4.0, "record": {}}


def test_store_merges_ranks_and_ignores_a_cut_line(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path)
    run = RunSpec("chartqa", "snapkv", "uniform", 64)
    with store.writer(run, 0) as write:
        write(_line(0, "a"))
        write(_line(2, "c"))
    with store.writer(run, 1) as write:
        write(_line(1, "b"))
    # an interruption in the middle of a write leaves half a line behind
    with open(store.path(run, 1), "a") as handle:
        handle.write('{"index": 3, "predic')
    assert {i: line["prediction"] for i, line in store.read(run).items()} == {0: "a", 1: "b", 2: "c"}
    # the owner drops the cut line before appending again
    with store.writer(run, 1) as write:
        write(_line(3, "d"))
    stored = [json.loads(text) for text in store.path(run, 1).read_text().splitlines()]
    assert stored == [_line(1, "b"), _line(3, "d")]
    assert sorted(store.read(run)) == [0, 1, 2, 3]
    assert store.read(RunSpec("chartqa", "full")) == {}


def test_a_complete_last_line_without_its_newline_is_not_counted(tmp_path: Path) -> None:
    """The write was cut right before its newline: reading and the writer must agree on dropping it,
    otherwise the sample counts as done and then disappears (one sample short until a 2nd resume)."""
    store = PredictionStore(tmp_path)
    run = RunSpec("chartqa", "full")
    with store.writer(run, 0) as write:
        write(_line(0, "a"))
    with open(store.path(run, 0), "a") as handle:
        handle.write(json.dumps(_line(1, "b")))  # parses, but no newline
    assert sorted(store.read(run)) == [0]
    with store.writer(run, 0) as write:
        write(_line(1, "b"))
    assert sorted(store.read(run)) == [0, 1]
    assert store.path(run, 0).read_text().count("\n") == 2


@pytest.mark.parametrize(
    "bad",
    [
        "[]",
        "{}",
        "null",
        "3",
        '"text"',
        '{"index": "1", "prediction": "x", "prompt_tokens": 1, "kept_tokens": 1, "record": {}}',
        '{"index": true, "prediction": "x", "prompt_tokens": 1, "kept_tokens": 1, "record": {}}',
        '{"index": -1, "prediction": "x", "prompt_tokens": 1, "kept_tokens": 1, "record": {}}',
        '{"index": 1, "prediction": "x", "prompt_tokens": 1, "kept_tokens": 1, "record": null}',
        '{"index": 1, "prediction": "x"}',
        "not json at all",
    ],
)
def test_lines_that_are_not_records_are_skipped_with_a_warning(tmp_path: Path, bad: str) -> None:
    store = PredictionStore(tmp_path)
    run = RunSpec("chartqa", "full")
    path = store.path(run, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_line(0, "a")) + "\n" + bad + "\n" + json.dumps(_line(2, "c")) + "\n")
    with pytest.warns(UserWarning, match=r"full\.rank0\.jsonl:2 is not a prediction record"):
        lines = store.read(run)
    assert {i: line["prediction"] for i, line in lines.items()} == {0: "a", 2: "c"}


# --------------------------------------------------------------------------------------------------
# Merging and the result files
# --------------------------------------------------------------------------------------------------


def _record_lines(store: PredictionStore, run: RunSpec, scores: list[float], rank: int = 0) -> None:
    with store.writer(run, rank) as write:
        for i, score in enumerate(scores):
            write(
                {
                    "index": i,
                    "prediction": "x",
                    "prompt_tokens": 100 + i,
                    "kept_tokens": 8.0,
                    "record": {"score": score, "type": "human_test"},
                }
            )


def test_merge_results_aggregates_complete_runs_only(tmp_path: Path) -> None:
    from mmshiftkv.evaluation.tasks import get_task

    store = PredictionStore(tmp_path)
    tasks = {"chartqa": get_task("chartqa")}
    full, snap = RunSpec("chartqa", "full"), RunSpec("chartqa", "snapkv", "uniform", 64)
    _record_lines(store, full, [1.0, 0.0, 1.0, 1.0])
    _record_lines(store, snap, [1.0, 0.0])
    results, incomplete = merge_results(store, [full, snap], tasks, {"chartqa": 4})
    assert len(results) == 1
    assert results[0]["method"] == "FullKV" and results[0]["budget"] is None
    assert results[0]["score"] == pytest.approx(75.0) and results[0]["table_score"] == pytest.approx(75.0)
    assert results[0]["mean_prompt_tokens"] == pytest.approx(101.5)
    assert incomplete == [{"task": "chartqa", "method": "SnapKV", "budget": 64, "done": 2, "total": 4}]
    # a smaller --limit later only uses the first samples
    results, incomplete = merge_results(store, [full, snap], tasks, {"chartqa": 2})
    assert [r["score"] for r in results] == pytest.approx([50.0, 50.0]) and incomplete == []


def test_table_score_puts_ocrbench_on_the_percent_scale() -> None:
    assert report.table_score("ocrbench", {"score": 683, "num_samples": 1000}) == pytest.approx(68.3)
    assert report.table_score("ocrbench", {"score": 3, "num_samples": 4}) == pytest.approx(75.0)
    assert report.table_score("docvqa_val", {"score": 81.6, "num_samples": 5349}) == pytest.approx(81.6)


def test_method_labels() -> None:
    assert report.method_label("full") == "FullKV"
    assert report.method_label("shiftkv", "uniform") == "MM-ShiftKV"
    assert report.method_label("shiftkv", "pyramid") == "PyramidKV + MM-ShiftKV"
    assert report.method_label("snapkv", "sparsemm") == "SparseMM + SnapKV"


def _result(task: str, method: str, budget: int | None, score: float) -> dict:
    return {"task": task, "method": method, "budget": budget, "table_score": score}


def test_markdown_table_layout_by_hand() -> None:
    results = [
        _result("ocrbench", "FullKV", None, 82.3),
        _result("docvqa_val", "FullKV", None, 94.5),
        _result("docvqa_val", "SnapKV", 64, 75.6),
        _result("ocrbench", "SnapKV", 64, 53.6),
        _result("docvqa_val", "MM-ShiftKV", 64, 81.6),
        _result("ocrbench", "MM-ShiftKV", 64, 68.8),
        _result("docvqa_val", "SnapKV", 128, 88.8),
        _result("ocrbench", "SnapKV", 128, 72.2),
        _result("docvqa_val", "MM-ShiftKV", 128, 88.9),  # its OCRBench run is missing
    ]
    expected = (
        "| Method | Budget | DocVQA | OCRBench | Avg |\n"
        "|---|---|---:|---:|---:|\n"
        "| FullKV | - | 94.5 | 82.3 | 88.4 |\n"
        "| SnapKV | 64 | 75.6 | 53.6 | 64.6 |\n"
        "| MM-ShiftKV | 64 | 81.6 | 68.8 | 75.2 |\n"
        "| SnapKV | 128 | 88.8 | 72.2 | 80.5 |\n"
        "| MM-ShiftKV | 128 | 88.9 |  |  |\n"
    )
    assert report.markdown_table(results, [64, 128]) == expected


def test_write_results_files(tmp_path: Path) -> None:
    results = [
        {**_result("chartqa", "FullKV", None, 80.0), "press": "full", "allocator": None, "score": 80.0},
        {**_result("chartqa", "SnapKV", 64, 60.0), "press": "snapkv", "allocator": "uniform", "score": 60.0},
        {**_result("chartqa", "SnapKV", 128, 70.0), "press": "snapkv", "allocator": "uniform", "score": 70.0},
    ]
    paths = report.write_results(results, tmp_path, [64, 128], plot=True)
    assert [p.name for p in paths] == ["results.json", "results.csv", "table.md", "score_vs_budget.png"]
    assert json.loads((tmp_path / "results.json").read_text()) == {"results": results, "incomplete": []}
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0].startswith("task,method,press,allocator,budget,score,table_score")
    assert lines[2].startswith("chartqa,SnapKV,snapkv,uniform,64,60.0,60.0")
    assert (tmp_path / "score_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_panels_outside_the_paper_tasks_keep_their_names_and_order(tmp_path: Path) -> None:
    results = [
        _result("uniform", "FullKV", None, 96.0),
        _result("AdaKV", "FullKV", None, 96.0),
        _result("uniform", "SnapKV", 8, 50.0),
        _result("AdaKV", "SnapKV", 8, 70.0),
        _result("chartqa", "SnapKV", 8, 10.0),
    ]
    assert report.markdown_table(results, [8]).splitlines()[:2] == [
        "| Method | Budget | ChartQA | uniform | AdaKV | Avg |",
        "|---|---|---:|---:|---:|---:|",
    ]
    path = report.plot_score_vs_budget(results, tmp_path / "panels.png", average=False, ylabel="accuracy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_refuses_another_setting(tmp_path: Path) -> None:
    tasks = build_tasks(EvalConfig(model="a", tasks=("chartqa",)))
    first = EvalConfig(model="a", tasks=("chartqa",)).fingerprint(tasks)
    (tmp_path / "config.json").write_text(json.dumps(first))
    # adding a task is fine, and is recorded
    both = build_tasks(EvalConfig(model="a", tasks=("chartqa", "ocrbench")))
    merged = merge_fingerprint(
        tmp_path, EvalConfig(model="a", tasks=("chartqa", "ocrbench")).fingerprint(both)
    )
    assert sorted(merged["tasks"]) == ["chartqa", "ocrbench"]
    with pytest.raises(runner.EvalSetupError, match="model"):
        merge_fingerprint(tmp_path, EvalConfig(model="b", tasks=("chartqa",)).fingerprint(tasks))
    longer = build_tasks(EvalConfig(model="a", tasks=("chartqa",), max_new_tokens=5))
    with pytest.raises(ValueError, match="tasks.chartqa"):
        merge_fingerprint(tmp_path, EvalConfig(model="a", tasks=("chartqa",)).fingerprint(longer))


# --------------------------------------------------------------------------------------------------
# Setup errors: raised before anything is generated
# --------------------------------------------------------------------------------------------------


def test_a_bad_head_score_file_is_rejected_with_the_configuration(tmp_path: Path) -> None:
    broken = tmp_path / "scores.json"
    broken.write_text("")
    with pytest.raises(ValueError, match=r"scores\.json' is not JSON"):
        EvalConfig(model="m", allocators=("uniform", "sparsemm"), head_scores=str(broken))
    # FullKV alone builds no allocator
    EvalConfig(model="m", presses=("full",), allocators=("sparsemm",), head_scores=str(broken))


class GenerationCounter:
    """Stands in for ``runner.generate_answers``; counts calls and answers every sample with "x"."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, processor, inputs, press, max_new_tokens):
        self.calls += 1
        n = inputs["input_ids"].shape[0]
        return [{"generated": "x", "prompt_tokens": 10, "kept_tokens": 4.0} for _ in range(n)]


@pytest.fixture
def chartqa_setup(tmp_path: Path, monkeypatch) -> tuple[dict, GenerationCounter]:
    from mmshiftkv.testing import tiny

    folders = write_task_datasets(tmp_path / "data", 2, tasks=["chartqa"])
    counter = GenerationCounter()
    monkeypatch.setattr(runner, "generate_answers", counter)
    model, processor = tiny("qwen2.5-vl")
    config = dict(
        model="tiny",
        tasks=("chartqa",),
        presses=("full", "snapkv"),
        budgets=(48,),
        dataset_ids={"chartqa": folders["chartqa"]},
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        plot=False,
    )
    return {"config": config, "model": model, "processor": processor, "root": tmp_path}, counter


def _evaluate(setup: dict, **overrides):
    config = EvalConfig(**{**setup["config"], **overrides})
    return runner.run_evaluation(config, setup["model"], setup["processor"])


def test_head_scores_of_another_model_fail_before_the_first_generation(chartqa_setup) -> None:
    setup, counter = chartqa_setup
    scores = setup["root"] / "other_model.json"
    scores.write_text(json.dumps({f"{layer}-{head}": [1.0] for layer in range(5) for head in range(3)}))
    with pytest.raises(runner.EvalSetupError, match="'sparsemm' does not fit.*5 layers x 3 query heads"):
        _evaluate(setup, allocators=("sparsemm",), head_scores=str(scores))
    assert counter.calls == 0


def test_a_second_evaluation_on_the_same_output_dir_is_refused(chartqa_setup) -> None:
    from filelock import FileLock

    setup, counter = chartqa_setup
    out = Path(setup["config"]["output_dir"])
    out.mkdir()
    with FileLock(out / "eval.lock"):  # the first evaluation, still running
        with pytest.raises(OutputDirBusyError, match="in use by another running evaluation"):
            _evaluate(setup)
        assert counter.calls == 0
    summary = _evaluate(setup)  # once it is done, the same command runs
    assert summary.complete and counter.calls == summary.computed == 4


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("Couldn't reach 'lmms-lab-encoder/ChartQA' on the Hub (LocalEntryNotFoundError)"),
        FileNotFoundError("Couldn't find any data file at /nowhere."),
    ],
)
def test_unreachable_data_is_one_error_naming_the_dataset_and_the_way_out(
    chartqa_setup, monkeypatch, error
) -> None:
    setup, counter = chartqa_setup

    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(runner.EvalSetupError) as info:
        _evaluate(setup, dataset_ids={})
    message = str(info.value)
    assert message.startswith(
        "cannot load ChartQA (chartqa) from 'lmms-lab-encoder/ChartQA', split 'test': "
        f"{type(error).__name__}: {str(error).rstrip('.')}. Without the hub"
    )
    assert "--dataset-id chartqa=FOLDER" in message
    assert (
        "FOLDER/data/test-00000-of-00001.parquet holding the columns question, answer, type, image" in message
    )
    assert "\n" not in message and counter.calls == 0


def test_a_local_folder_without_a_task_column_names_it(chartqa_setup) -> None:
    setup, counter = chartqa_setup
    folders = write_task_datasets(setup["root"] / "no_type", 2, tasks=["chartqa"])
    table = datasets.load_dataset(folders["chartqa"], split="test").remove_columns("type")
    table.to_parquet(str(Path(folders["chartqa"]) / "data" / "test-00000-of-00001.parquet"))
    with pytest.raises(
        runner.EvalSetupError, match=r"has no column\(s\) type \(it has question, answer, image"
    ):
        _evaluate(setup, dataset_ids={"chartqa": folders["chartqa"]}, cache_dir=str(setup["root"] / "c2"))
    assert counter.calls == 0


def test_a_local_folder_needs_no_dataset_config(tmp_path: Path) -> None:
    (tmp_path / "docvqa").mkdir()
    config = EvalConfig(
        model="m", tasks=("docvqa_val",), dataset_ids={"docvqa_val": str(tmp_path / "docvqa")}
    )
    assert build_tasks(config)["docvqa_val"].dataset_config is None
    # a hub id keeps the task's config, an explicit one wins
    assert build_tasks(EvalConfig(model="m", tasks=("docvqa_val",)))["docvqa_val"].dataset_config == "DocVQA"
    explicit = EvalConfig(
        model="m",
        tasks=("docvqa_val",),
        dataset_ids={"docvqa_val": str(tmp_path / "docvqa")},
        dataset_configs={"docvqa_val": "mine"},
    )
    assert build_tasks(explicit)["docvqa_val"].dataset_config == "mine"


def test_model_loading_hides_the_weight_progress_bar_and_restores_it(monkeypatch) -> None:
    from transformers.utils import logging as transformers_logging

    seen = []

    def from_pretrained(*args, **kwargs):
        seen.append(transformers_logging.is_progress_bar_enabled())
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection"
        )

    monkeypatch.setattr(generation.AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    assert transformers_logging.is_progress_bar_enabled()
    with pytest.raises(generation.EvalSetupError) as info:
        generation.load_model("org/model")
    assert seen == [False] and transformers_logging.is_progress_bar_enabled()
    assert str(info.value) == (
        "cannot load the model 'org/model': OSError: We couldn't connect to 'https://huggingface.co' to load "
        "the files. Without the hub, pass --model a local directory holding the checkpoint and its "
        "processor (save_pretrained)"
    )
