"""benchmarks/gpu_acceptance.py: its plan fits the 8-minute budget, and its steps run (CPU smoke mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mmshiftkv.registry import PRESSES
from mmshiftkv.testing import FAMILIES

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_acceptance.py"
STEPS = [
    "environment",
    "install",
    "op_tests",
    "op_vs_reference",
    "scoring_overhead",
    "generate",
    "headwise_decode",
    "profile",
]


def _run(tmp_path: Path, *arguments: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", str(report), *arguments],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    return done, json.loads(report.read_text())


def test_dry_run_plans_every_step_within_eight_minutes(tmp_path: Path) -> None:
    done, report = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    steps = report["steps"]
    assert [step["name"] for step in steps] == STEPS
    assert all(step["status"] == "planned" for step in steps)
    # Every step has its own cap, and the caps add up to less than the whole run may take.
    assert all(5 <= step["cap_s"] <= 150 for step in steps)
    assert report["planned_caps_s"] == sum(step["cap_s"] for step in steps) <= 8 * 60
    install = next(step for step in steps if step["name"] == "install")
    assert install["command"][-4:] == ["--no-build-isolation", "--no-deps", "-e", str(SCRIPT.parent.parent)]
    for name in ("op_vs_reference", "scoring_overhead"):
        command = next(step for step in steps if step["name"] == name)["command"]
        assert command[command.index("--device") + 1] == "cuda"


def test_unknown_step_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--only", "environment,warp_drive"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "warp_drive" in done.stderr


def test_cpu_smoke_runs_the_steps_and_records_their_output(tmp_path: Path) -> None:
    # Caps stretched for a shared CPU runner; the real run keeps them (see the dry-run test).
    arguments = ["--time-scale", "10", "--time-budget", "1500"]
    # The benchmark scripts it calls have their own smoke tests (tests/test_benchmarks.py).
    done, report = _run(tmp_path, "--cpu", "--only", "environment,generate", *arguments)
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == ["environment", "generate"]
    assert all(step["status"] == "passed" for step in steps.values()), done.stderr
    assert steps["environment"]["output_json"]["missing_required"] == []
    generate = steps["generate"]["output_json"]
    assert len(generate["runs"]) == len(FAMILIES) * len(PRESSES) and generate["failures"] == []
    assert all(run.get("new_tokens", 0) >= 1 for run in generate["runs"])
    assert done.returncode == 0
