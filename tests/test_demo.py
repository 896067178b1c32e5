"""The README demo: the embedded grounding model answers known questions under every press."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmshiftkv import demo


def test_demo_answers_every_question_with_the_full_cache(capsys) -> None:
    assert demo.main(["--presses", "snapkv", "--budgets", "16,4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    full = next(line for line in lines if line.startswith("FullKVPress"))
    assert full.count(" ok") == 4 and "WRONG" not in full
    questions = demo.grounding_questions(0)
    for number, question in enumerate(questions, 1):
        assert f"  Q{number}: {question.text}  (expected {question.expected!r})" in lines
    assert len({id(q.image) for q in questions}) == 4
    assert len({q.image.tobytes() for q in questions}) == 1
    assert sum(line.startswith("SnapKVPress") for line in lines) == 2
    with pytest.raises(SystemExit):
        demo.main(["--question", "What?"])


def test_demo_prints_no_warning_in_a_fresh_interpreter() -> None:
    """The first screen, as a user runs it: no transformers warning (the embedded checkpoint's bos/eos
    ids are inside its 263-token vocabulary, its image processor is this release's name)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "mmshiftkv.demo", "--presses", "snapkv", "--budgets", "4"]
    completed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "FullKVPress" in completed.stdout
    assert completed.stderr.strip() == ""
