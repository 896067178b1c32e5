"""The ``mmshiftkv`` commands end to end, offline.

A tiny Qwen2.5-VL is saved with ``save_pretrained`` so the real ``from_pretrained`` loading path
runs, and every task gets a tiny local dataset in its hub schema. The ChartQA references are the
answers a plain ``model.generate`` (written out here, without the runner) gives under FullKV, so
the table's ChartQA cells are known in advance for every press.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_evaluation_runner import task_rows, textcaps_available, write_task_datasets
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmshiftkv.demo
import mmshiftkv.evaluation.calibrate
from mmshiftkv import generation
from mmshiftkv.cli import main as mmshiftkv_main
from mmshiftkv.evaluation import analysis, runner
from mmshiftkv.evaluation.analysis import attention_coverage
from mmshiftkv.presses import FullKVPress, ShiftKVPress, SnapKVPress, StreamingLLMPress
from mmshiftkv.testing import tiny

N = 3
MAX_NEW_TOKENS = 2
BUDGETS = (16, 32)
TASK_NAMES = [t for t in task_rows(1) if t != "textcaps_val" or textcaps_available()]
CHARTQA_POST_PROMPT = "\nAnswer the question with a single word."  # lmms-eval chartqa default prompt


def direct_answers(model, processor, questions, images, make_press: Callable) -> list[str]:
    """One plain greedy ``generate`` per question under a fresh press, post-processed as lmms-eval."""
    answers = []
    for question, image in zip(questions, images):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with make_press()(model), torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        generated = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(generated.split("\n\n")[0].strip())
    return answers


def eval_args(ws: dict, output: str, tasks: list[str], presses: str, budgets: str) -> list[str]:
    args = ["eval", "--model", ws["model"], "--tasks", ",".join(tasks), "--presses", presses]
    args += ["--budgets", budgets, "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2"]
    args += ["--output-dir", str(ws["root"] / output), "--cache-dir", str(ws["root"] / "cache")]
    for task in tasks:
        args += ["--dataset-id", f"{task}={ws['folders'][task]}"]
    return [*args, "--dataset-config", "docvqa_val="]


def predictions(output_dir: Path) -> dict[tuple[str, str], dict[int, str]]:
    """(task, run file stem) -> index -> prediction, over all rank files."""
    found: dict[tuple[str, str], dict[int, str]] = {}
    for path in sorted((output_dir / "predictions").glob("*/*.jsonl")):
        key = (path.parent.name, path.name.split(".rank")[0])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record["index"] not in found.setdefault(key, {}), "a sample was stored twice"
            found[key][record["index"]] = record["prediction"]
    return found


def results(output_dir: Path) -> dict[tuple, dict]:
    return {
        (r["task"], r["method"], r["budget"]): r
        for r in json.loads((output_dir / "results.json").read_text())["results"]
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """The saved tiny model, the datasets and one uninterrupted evaluation (run A)."""
    root = tmp_path_factory.mktemp("cli")
    model, processor = tiny("qwen2.5-vl")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    loaded = AutoModelForImageTextToText.from_pretrained(root / "model").eval()
    loaded_processor = AutoProcessor.from_pretrained(root / "model")

    _, columns, _ = task_rows(N)["chartqa"]
    questions = [q + CHARTQA_POST_PROMPT for q in columns["question"]]
    full = direct_answers(loaded, loaded_processor, questions, columns["image"], FullKVPress)
    references = [full[0], full[1], "zzz"]  # two answers as FullKV gives them, one it cannot give
    expected = {("FullKV", None): full}
    for budget in BUDGETS:
        for name, cls in (("MM-ShiftKV", ShiftKVPress), ("SnapKV", SnapKVPress)):
            expected[(name, budget)] = direct_answers(
                loaded, loaded_processor, questions, columns["image"], lambda cls=cls, b=budget: cls(budget=b)
            )
    folders = write_task_datasets(root / "data", N, overrides={"chartqa": {"answer": references}})
    ws = {"root": root, "model": str(root / "model"), "folders": folders}
    ws["chartqa_references"], ws["chartqa_direct"] = references, expected
    assert mmshiftkv_main(eval_args(ws, "a", TASK_NAMES, "full,shiftkv,snapkv", "16,32")) == 0
    return ws


def test_eval_table_for_every_task_two_presses_two_budgets(ws: dict) -> None:
    out = ws["root"] / "a"
    table = (out / "table.md").read_text().splitlines()
    columns = ["DocVQA", "OCRBench", "TextVQA", "ChartQA", "TextCaps", "MMMU"]
    columns = [c for c in columns if c != "TextCaps" or "textcaps_val" in TASK_NAMES]
    assert table[0] == "| " + " | ".join(["Method", "Budget", *columns, "Avg"]) + " |"
    rows = [line.strip("| ").split(" | ") for line in table[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("FullKV", "-"),
        ("MM-ShiftKV", "16"),
        ("SnapKV", "16"),
        ("MM-ShiftKV", "32"),
        ("SnapKV", "32"),
    ]
    stored = results(out)
    assert len(stored) == 5 * len(TASK_NAMES)
    chartqa = columns.index("ChartQA") + 2
    references = ws["chartqa_references"]
    for row in rows:
        budget = None if row[1] == "-" else int(row[1])
        answers = ws["chartqa_direct"][(row[0], budget)]
        # relaxed accuracy of non-numeric strings: equal ignoring case
        expected = 100 * sum(a.lower() == r.lower() for a, r in zip(answers, references)) / N
        assert row[chartqa] == f"{expected:.1f}"
        cells = [stored[(task, row[0], budget)]["table_score"] for task in TASK_NAMES]
        assert row[-1] == f"{sum(cells) / len(cells):.1f}"
        assert all(stored[(task, row[0], budget)]["num_samples"] == N for task in TASK_NAMES)
    assert stored[("chartqa", "FullKV", None)]["score"] == pytest.approx(200 / 3)

    # the runner generated exactly what a plain generate call gives, press by press
    stored_predictions = predictions(out)
    for (method, budget), answers in ws["chartqa_direct"].items():
        key = (
            "full"
            if budget is None
            else f"{'shiftkv' if method == 'MM-ShiftKV' else 'snapkv'}__uniform__{budget}"
        )
        assert stored_predictions[("chartqa", key)] == dict(enumerate(answers))
    lines = [
        json.loads(x)
        for x in (out / "predictions/chartqa/snapkv__uniform__16.rank0.jsonl").read_text().splitlines()
    ]
    assert all(0 < line["kept_tokens"] <= 16 < line["prompt_tokens"] for line in lines)

    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,method,press,allocator,budget,score,table_score,num_samples")
    assert len(csv_lines) == 1 + len(stored)
    assert (out / "score_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    assert set(json.loads((out / "config.json").read_text())["tasks"]) == set(TASK_NAMES)


def test_eval_resumes_after_interruptions_without_recomputing(ws: dict, monkeypatch, capsys) -> None:
    tasks = ["docvqa_val", "chartqa"]
    args = eval_args(ws, "b", tasks, "full,shiftkv,snapkv", "16,32")
    out = ws["root"] / "b"
    total = len(tasks) * 5 * N
    generate = runner.generate_answers
    generated: list[int] = []

    def counting(*a, **k):
        answers = generate(*a, **k)
        generated.append(len(answers))
        return answers

    monkeypatch.setattr(runner, "generate_answers", counting)

    # 1. a job slice: stops after 5 new samples (DocVQA FullKV complete, MM-ShiftKV B=16 2 of 3)
    assert mmshiftkv_main([*args, "--max-samples-this-run", "5"]) == 0
    assert "incomplete: docvqa_val MM-ShiftKV B=16: 2/3 samples" in capsys.readouterr().out
    partial = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["method"]) for r in partial["results"]] == [("docvqa_val", "FullKV")]
    assert len(partial["incomplete"]) == 9 and sum(generated) == 5
    assert sum(map(len, predictions(out).values())) == 5

    # 2. killed in the middle of a run: what was produced before is kept
    calls = len(generated)

    def dies(*a, **k):
        if len(generated) == calls + 3:
            raise KeyboardInterrupt
        return counting(*a, **k)

    monkeypatch.setattr(runner, "generate_answers", dies)
    with pytest.raises(KeyboardInterrupt):
        mmshiftkv_main(args)
    done = sum(generated)
    assert 5 < done < total and sum(map(len, predictions(out).values())) == done
    before = {p: p.read_bytes() for p in (out / "predictions").glob("*/*.jsonl")}

    # 3. resumed: only the missing samples are generated, old lines are kept as they are
    monkeypatch.setattr(runner, "generate_answers", counting)
    assert mmshiftkv_main(args) == 0
    assert sum(generated) == total
    for path, content in before.items():
        assert path.read_bytes().startswith(content)

    uninterrupted = {k: v for k, v in results(ws["root"] / "a").items() if k[0] in tasks}
    assert results(out) == uninterrupted
    reference = predictions(ws["root"] / "a")
    assert predictions(out) == {k: v for k, v in reference.items() if k[0] in tasks}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_single_process_results(ws: dict) -> None:
    """``accelerate launch`` with 2 CPU processes (gloo): samples sharded, main merges."""
    tasks = ["chartqa", "ocrbench"]
    args = eval_args(ws, "c", tasks, "full,snapkv", "16")[1:]  # without the "eval" command
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [*launch, "-m", "mmshiftkv.evaluation", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = ws["root"] / "c"
    # 3 samples over 2 processes: the first gets 2, the second 1, each in its own file
    for task in tasks:
        for stem in ("full", "snapkv__uniform__16"):
            lines = [
                len((out / "predictions" / task / f"{stem}.rank{r}.jsonl").read_text().splitlines())
                for r in (0, 1)
            ]
            assert lines == [2, 1]
    single = results(ws["root"] / "a")
    merged = results(out)
    assert set(merged) == {(t, m, b) for t in tasks for m, b in (("FullKV", None), ("SnapKV", 16))}
    assert merged == {k: single[k] for k in merged}
    assert "| FullKV | - |" in done.stdout


def test_analyze_reports_full_coverage_one_and_press_coverage_in_unit_interval(ws: dict) -> None:
    out = ws["root"] / "fig1"
    args = ["analyze", "--model", ws["model"], "--synthetic", "--num-samples", "2", "--image-size", "56"]
    args += ["--presses", "full,streaming_llm,snapkv", "--budget", "8", "--max-new-tokens", "3"]
    assert mmshiftkv_main([*args, "--output-dir", str(out)]) == 0
    data = json.loads((out / "fig1.json").read_text())
    assert data["source"] == "synthetic" and data["num_samples"] == 2 and data["budget"] == 8
    coverage = data["coverage"]
    assert coverage["full"]["distribution"] == [1.0] * 4  # 2 samples x 2 decode steps
    assert coverage["full"]["mean"] == 1.0 and coverage["full"]["std"] == 0.0
    for name in ("streaming_llm", "snapkv"):
        assert all(0.0 <= v <= 1.0 for v in coverage[name]["distribution"])
        assert coverage[name]["mean"] < 1.0 and len(coverage[name]["per_layer"]) == 2

    # the per-sample numbers are attention_coverage on the same prompt, built here by hand
    model = AutoModelForImageTextToText.from_pretrained(ws["model"]).eval()
    processor = AutoProcessor.from_pretrained(ws["model"])
    for i, conversation in enumerate(analysis.synthetic_conversations(2, 56)):
        image = conversation[0]["content"][0]["image"]
        text = processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": analysis.SYNTHETIC_QUESTION}],
                }
            ],
            add_generation_prompt=True,
        )
        inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
        direct = attention_coverage(model, inputs, StreamingLLMPress(budget=8), max_new_tokens=3)
        assert coverage["streaming_llm"]["per_sample"][i] == pytest.approx(direct.mean, abs=1e-6)

    shifts = data["hidden_state_shift"]
    assert [s["layer"] for s in shifts] == [0, 1]
    assert all(s["std_ratio"] == pytest.approx(s["decode_std"] / s["prefill_std"]) for s in shifts)
    for name in ("fig1a_hidden_state_shift.png", "fig1b_attention_coverage.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_analyze_on_task_samples(ws: dict) -> None:
    out = ws["root"] / "fig1-ocr"
    args = [
        "analyze",
        "--model",
        ws["model"],
        "--task",
        "ocrbench",
        "--dataset-id",
        ws["folders"]["ocrbench"],
    ]
    args += ["--cache-dir", str(ws["root"] / "cache"), "--num-samples", "2", "--presses", "full,snapkv"]
    assert (
        mmshiftkv_main(
            [*args, "--budget", "8", "--max-new-tokens", "2", "--no-plot", "--output-dir", str(out)]
        )
        == 0
    )
    data = json.loads((out / "fig1.json").read_text())
    assert data["source"] == "task:ocrbench" and data["num_samples"] == 2
    assert data["coverage"]["full"]["mean"] == 1.0 and 0.0 <= data["coverage"]["snapkv"]["mean"] <= 1.0
    assert not (out / "fig1a_hidden_state_shift.png").exists()


def test_commands_dispatch(monkeypatch, capsys) -> None:
    assert mmshiftkv_main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("demo", "eval", "analyze", "profile", "calibrate"))
    assert mmshiftkv_main(["train"]) == 2
    seen = []
    monkeypatch.setattr(mmshiftkv.demo, "main", lambda argv: seen.append(("demo", list(argv))) or 0)
    monkeypatch.setattr(
        mmshiftkv.evaluation.calibrate, "main", lambda argv: seen.append(("calibrate", list(argv)))
    )
    assert mmshiftkv_main(["demo", "--budgets", "8"]) == 0
    assert mmshiftkv_main(["calibrate", "model", "out.json"]) == 0
    assert seen == [("demo", ["--budgets", "8"]), ("calibrate", ["model", "out.json"])]
    with pytest.raises(SystemExit) as exit_info:
        mmshiftkv_main(["eval", "--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize(
    "bad",
    [
        ["--presses", "h2o"],
        ["--allocators", "sparsemm"],
        ["--tasks", "vqav2"],
        ["--budgets", "64,abc"],
        ["--dataset-id", "nope=/x"],
    ],
)
def test_eval_rejects_bad_options(bad: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mmshiftkv_main(["eval", "--model", "m", *bad])
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------------------------------
# mmshiftkv demo
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budgets", ["0", "16,-4", "16,x"])
def test_demo_rejects_bad_budgets_in_one_line(budgets: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mmshiftkv_main(["demo", "--budgets", budgets])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --budgets" in err and "Traceback" not in err


def test_demo_help_says_what_it_does_and_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        mmshiftkv_main(["demo", "-h"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.startswith("Every press at shrinking budgets answering questions about one image")
    assert "README" not in description
    presses_help = text.split("--presses PRESSES")[-1].split("--budgets")[0]
    assert "shiftkv" in presses_help and "streaming_llm" in presses_help
    assert "padding excluded" in " ".join(text.split())


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        ("Answer: K", "K"),
        ("Answer: AK4FT7", "AK4FT7"),
        ("Answer: r: 6", "6"),  # the lead-in repeated in part
        ("AnsweA", "A"),  # the lead-in cut short
        ("r: 0", "0"),
        ("Answer", ""),
        ("Answer: ", ""),
        ("K", "K"),  # no lead-in at all
        ("2", "2"),
    ],
)
def test_demo_answers_are_shown_without_the_lead_in(answer: str, shown: str) -> None:
    assert mmshiftkv.demo.strip_lead_in(answer, "Answer: ") == shown
    assert mmshiftkv.demo.strip_lead_in(answer, "") == answer  # --model runs have no lead-in
    verdict = "ok" if shown == "K" else "WRONG"
    assert mmshiftkv.demo.mark(answer, "K", "Answer: ") == f"{shown!r} {verdict}"


def test_demo_per_question_bytes_and_image_tokens_by_hand() -> None:
    from mmshiftkv.grounding import load_grounding_model

    demo = mmshiftkv.demo
    model, processor = load_grounding_model()
    questions = demo.grounding_questions(0)[:2]
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": q.image}, {"type": "text", "text": q.text}]}]
        for q in questions
    ]
    inputs = generation.encode_messages(processor, conversations, model.device)
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = ids == model.config.image_token_id
    config = model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * config.num_key_value_heads * 2 * head_dim * 4  # fp32 K + V
    n_real = real.sum(-1).tolist()

    full = demo.run_one(model, processor, inputs, FullKVPress(), max_new_tokens=2)
    assert full["kv_bytes_before_per_sample"] == [n * per_token for n in n_real]
    assert full["kv_bytes_after_per_sample"] == full["kv_bytes_before_per_sample"]
    assert full["kv_bytes_before_batch"] == len(questions) * ids.shape[1] * per_token  # padding included
    assert full["image_tokens_per_head"] == pytest.approx(image.sum().item() / len(questions), abs=0.05)

    budget = 8
    for press, kept_positions in (
        # StreamingLLM: the first 4 real tokens and the last budget - 4
        (StreamingLLMPress(budget=budget), lambda b: [*real[b].nonzero()[:4, 0].tolist(), *range(-4, 0)]),
        # SnapKV: the most recent tokens of its 32-token window
        (SnapKVPress(budget=budget), lambda b: list(range(-budget, 0))),
    ):
        row = demo.run_one(model, processor, inputs, press, max_new_tokens=2)
        assert row["kv_bytes_after_per_sample"] == [budget * per_token] * len(questions)
        expected = [int(image[b, kept_positions(b)].sum()) for b in range(len(questions))]
        assert row["image_tokens_per_head"] == pytest.approx(sum(expected) / len(expected), abs=0.05)


def test_demo_table_explains_the_presses_that_lose_the_image(capsys) -> None:
    assert mmshiftkv_main(["demo", "--presses", "snapkv,streaming_llm", "--budgets", "32,8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("FullKVPress", "SnapKVPress", "StreamingLLMPress"))]
    assert len(rows) == 5 and all("KV/question" in row and "img/head=" in row for row in rows)
    assert all("img/head=  0.0" in row for row in rows[1:])  # neither keeps an image token
    assert "img/head=  0.0" not in rows[0]
    why = [line for line in lines if line.startswith("why: ")]
    assert len(why) == 2
    assert why[0].startswith("why: SnapKV always keeps its observation window, the last 32 prompt tokens")
    assert why[1].startswith("why: StreamingLLM keeps 4 sink tokens and the most recent ones")

    # a budget above every prompt keeps the whole image: nothing to explain
    with pytest.warns(UserWarning, match="uncompressed"):
        assert mmshiftkv_main(["demo", "--presses", "snapkv", "--budgets", "128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "img/head= 16.0" in next(line for line in lines if line.startswith("SnapKVPress"))
    assert not [line for line in lines if line.startswith("why: ")]


# --------------------------------------------------------------------------------------------------
# README "Evaluate on your own or offline data", and one-line setup errors
# --------------------------------------------------------------------------------------------------

#: The README's command, with ``$(python -c ...)`` standing for the embedded checkpoint's folder.
README_EVAL_COMMAND = """mmshiftkv eval --model CHECKPOINT \\
    --tasks chartqa --dataset-id chartqa=my-chartqa \\
    --presses full,shiftkv,snapkv --budgets 32,64 --max-new-tokens 8 \\
    --output-dir my-chartqa-eval --no-plot"""


def _readme_chart_folder() -> None:
    """The README's Python block: three chart questions as a local ChartQA folder (in the cwd)."""
    import datasets
    from PIL import Image, ImageDraw

    def bar_chart(values: list[int]) -> Image.Image:
        image = Image.new("RGB", (224, 112), "white")
        draw = ImageDraw.Draw(image)
        for i, value in enumerate(values):
            draw.rectangle([20 + 60 * i, 100 - value, 60 + 60 * i, 100], fill="steelblue")
            draw.text((30 + 60 * i, 88 - value), str(value), fill="black")
        return image

    rows = {
        "question": [
            "What is the value of the first bar?",
            "Which bar is the tallest?",
            "What is the sum of the bars?",
        ],
        "answer": ["30", "2", "150"],
        "type": ["human_test", "human_test", "augmented_test"],
        "image": [bar_chart([30, 80, 40]), bar_chart([20, 70, 10]), bar_chart([50, 60, 40])],
    }
    folder = Path("my-chartqa/data")
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "test-00000-of-00001.parquet"))


def test_readme_offline_evaluation_of_a_local_folder_runs_as_documented(tmp_path, monkeypatch) -> None:
    import shlex

    from mmshiftkv.grounding import load_grounding_model
    from mmshiftkv.grounding.model import CHECKPOINT_DIR

    monkeypatch.chdir(tmp_path)
    _readme_chart_folder()
    command = README_EVAL_COMMAND.replace("CHECKPOINT", str(CHECKPOINT_DIR)).replace("\\\n", " ")
    command = shlex.split(command)
    assert command[0] == "mmshiftkv"
    assert mmshiftkv_main([*command[1:], "--cache-dir", str(tmp_path / "cache")]) == 0

    out = tmp_path / "my-chartqa-eval"
    rows = [line.strip("| ").split(" | ")[:2] for line in (out / "table.md").read_text().splitlines()[2:]]
    assert rows == [
        ["FullKV", "-"],
        ["MM-ShiftKV", "32"],
        ["SnapKV", "32"],
        ["MM-ShiftKV", "64"],
        ["SnapKV", "64"],
    ]
    assert {r["num_samples"] for r in json.loads((out / "results.json").read_text())["results"]} == {3}

    # FullKV's stored answers are what a plain generate gives on the same prompts
    model, processor = load_grounding_model()
    import datasets

    table = datasets.load_dataset("my-chartqa", split="test", cache_dir=str(tmp_path / "cache2"))
    expected = []
    for row in table:
        question = row["question"] + CHARTQA_POST_PROMPT
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(images=[row["image"].convert("RGB")], text=[text], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        expected.append(answer.split("\n\n")[0].strip())
    assert predictions(out)[("chartqa", "full")] == dict(enumerate(expected))


def test_eval_setup_errors_are_one_line_without_traceback(tmp_path, capsys) -> None:
    folder = write_task_datasets(tmp_path / "data", 1, tasks=["chartqa"])["chartqa"]
    missing = tmp_path / "no-such-folder"
    cases = [
        (
            ["--model", "unused", "--dataset-id", f"chartqa={missing}"],
            [
                f"mmshiftkv eval: error: cannot load ChartQA (chartqa) from '{missing}', split 'test': ",
                "FileNotFoundError",
                "--dataset-id chartqa=FOLDER with FOLDER/data/test-00000-of-00001.parquet holding the "
                "columns question, answer, type, image",
            ],
        ),
        (
            ["--model", str(tmp_path / "no-model"), "--dataset-id", f"chartqa={folder}"],
            [f"mmshiftkv eval: error: cannot load the model '{tmp_path / 'no-model'}': ", "save_pretrained"],
        ),
    ]
    capsys.readouterr()  # the folder's parquet progress bar
    for number, (extra, fragments) in enumerate(cases):
        args = ["eval", "--tasks", "chartqa", "--presses", "full", "--no-plot", *extra]
        args += ["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / f"out{number}")]
        assert mmshiftkv_main(args) == 1
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]  # after the datasets progress bars, if any
        assert "Traceback" not in err and line.startswith(fragments[0]), err
        assert all(fragment in line for fragment in fragments[1:]), err
