"""The README demo: the embedded grounding model answers known questions under every press."""

from __future__ import annotations

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
