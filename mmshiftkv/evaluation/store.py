"""The prediction files of an evaluation: one JSON line per sample, resumable, merged over processes.

Every generated answer is scored and appended, as one JSON line, to the prediction file of its run
the moment it is produced (flushed), so a run interrupted at any point resumes where it stopped.
Each process appends to its own file (``<run>.rank<r>.jsonl``); reading merges them. The output
directory is locked while an evaluation runs, and its ``config.json`` records what the stored
predictions depend on (:func:`merge_fingerprint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from filelock import FileLock, Timeout

from mmshiftkv.evaluation import report
from mmshiftkv.evaluation.config import RunSpec
from mmshiftkv.evaluation.tasks import TaskSpec
from mmshiftkv.generation import EvalSetupError


class OutputDirBusyError(EvalSetupError):
    """Another evaluation holds the lock of the output directory."""


class PredictionStore:
    """Per-run JSONL prediction files under ``<root>/predictions/<task>/``.

    Each process appends to its own ``<run>.rank<r>.jsonl``; reading a run merges every rank's
    file (also those of an earlier invocation with another number of processes). Only lines ending
    in a newline count: a last line without one was cut by an interruption (even when what was
    written happens to parse), is ignored on reading and removed before the owning process appends
    again, so its sample is generated once more. Lines that are not prediction records (``[]``,
    ``{}``, ``null``, a record without its fields) are skipped with a warning naming the file.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root) / "predictions"

    def path(self, run: RunSpec, rank: int) -> Path:
        return self.root / run.task / f"{run.key}.rank{rank}.jsonl"

    def read(self, run: RunSpec) -> dict[int, dict[str, Any]]:
        """Sample index -> stored line, over all rank files of ``run``."""
        lines: dict[int, dict[str, Any]] = {}
        for path in sorted((self.root / run.task).glob(f"{run.key}.rank*.jsonl")):
            with open(path, encoding="utf-8") as handle:
                for number, text in enumerate(handle, 1):
                    if not text.endswith("\n"):
                        continue  # the tail of an interrupted write
                    try:
                        line = json.loads(text)
                    except json.JSONDecodeError:
                        line = None
                    if not _is_record(line):
                        warnings.warn(f"{path}:{number} is not a prediction record, skipped", stacklevel=2)
                        continue
                    lines.setdefault(line["index"], line)
        return lines

    @contextlib.contextmanager
    def writer(self, run: RunSpec, rank: int) -> Iterator[Callable[[dict[str, Any]], None]]:
        """A function appending one line and flushing it, valid inside the ``with`` block."""
        path = self.path(run, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(path)
        with open(path, "a", encoding="utf-8") as handle:

            def write(line: dict[str, Any]) -> None:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                handle.flush()

            yield write


#: The fields every stored line has (written by the runner, read by :func:`merge_results`).
RECORD_FIELDS = ("index", "prediction", "prompt_tokens", "kept_tokens", "record")


def _is_record(line: Any) -> bool:
    if not isinstance(line, dict) or any(name not in line for name in RECORD_FIELDS):
        return False
    index = line["index"]
    valid_index = isinstance(index, int) and not isinstance(index, bool) and index >= 0
    return valid_index and isinstance(line["record"], dict)


def _drop_partial_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def merge_fingerprint(output_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The stored ``config.json`` extended by this invocation's new tasks.

    Raises
    ------
    EvalSetupError
        If the stored setting differs from ``fingerprint`` in a common field or in a task both hold.
    """
    path = output_dir / "config.json"
    current = json.loads(json.dumps(fingerprint))  # tuples -> lists, as stored
    if not path.exists():
        return current
    stored = json.loads(path.read_text(encoding="utf-8"))
    differing = sorted(
        k for k in set(stored) | set(current) if k != "tasks" and stored.get(k) != current.get(k)
    )
    differing += sorted(
        f"tasks.{name}"
        for name in set(stored["tasks"]) & set(current["tasks"])
        if stored["tasks"][name] != current["tasks"][name]
    )
    if differing:
        raise EvalSetupError(
            f"{output_dir} holds predictions of another setting (differs in: {', '.join(differing)}); "
            "use another --output-dir or remove it"
        )
    stored["tasks"].update(current["tasks"])
    return stored


@contextlib.contextmanager
def output_dir_lock(output_dir: Path, state: PartialState) -> Iterator[None]:
    """Hold ``output_dir/eval.lock`` (main process) for the whole evaluation.

    The OS releases the lock when the process dies, so a killed run never leaves a stale lock. The
    other processes of the same launch share the main process's lock; if it cannot be taken the
    main process raises and the launcher (accelerate/torchrun) stops the others.
    """
    if not state.is_main_process:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(output_dir / "eval.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputDirBusyError(
            f"{output_dir} is in use by another running evaluation: wait for it to finish, then rerun "
            "this command (it resumes), or use another --output-dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


def merge_results(
    store: PredictionStore,
    runs: Sequence[RunSpec],
    tasks: Mapping[str, TaskSpec],
    sizes: Mapping[str, int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Aggregate every run whose samples ``0..size-1`` are all stored; list the others.

    Returns
    -------
    results : list of dict
        Per complete run: ``task``, ``task_display``, ``press``, ``allocator``, ``budget``,
        ``method``, ``score`` (the task's reported number), ``table_score`` (0-100 scale of the
        paper's tables), ``num_samples``, ``metrics`` (the task's full aggregate),
        ``mean_prompt_tokens`` and ``mean_kept_tokens`` (per KV head).
    incomplete : list of dict
        ``task``, ``method``, ``budget``, ``done``, ``total`` of the runs with missing samples.
    """
    results, incomplete = [], []
    for run in runs:
        task, total = tasks[run.task], sizes[run.task]
        lines = store.read(run)
        found = [lines[i] for i in range(total) if i in lines]
        method = report.method_label(run.press, run.allocator)
        if len(found) < total:
            incomplete.append(
                {"task": run.task, "method": method, "budget": run.budget, "done": len(found), "total": total}
            )
            continue
        metrics = task.aggregate([line["record"] for line in found])
        results.append(
            {
                "task": run.task,
                "task_display": task.display_name,
                "press": run.press,
                "allocator": run.allocator,
                "budget": run.budget,
                "method": method,
                "score": metrics["score"],
                "table_score": report.table_score(run.task, metrics),
                "num_samples": total,
                "metrics": metrics,
                "mean_prompt_tokens": sum(line["prompt_tokens"] for line in found) / total,
                "mean_kept_tokens": sum(line["kept_tokens"] for line in found) / total,
            }
        )
    return results, incomplete
