"""Run presses over the paper's benchmarks, resumably and data-parallel (``mmshiftkv eval``).

One evaluation is a grid of *runs*: (task, press, allocator, budget), with FullKV run once per
task (it has no budget). Every generated answer is scored and appended, as one JSON line, to the
prediction file of its run the moment it is produced (flushed), so a run interrupted at any point
resumes where it stopped: samples already in the files are skipped, nothing is recomputed.

Data parallelism (accelerate): launched with N processes (``accelerate launch --multi_gpu
--num_processes N -m mmshiftkv.evaluation ...`` or ``torchrun --nproc_per_node N ...``), the
pending samples of each run are split between the processes, each process appends to its own
file (``<run>.rank<r>.jsonl``), and the main process merges all files and aggregates once every
process is done. Models bigger than one GPU load with ``device_map="auto"`` in one process.

Files under ``output_dir``::

    config.json                            what the predictions depend on (checked on resume)
    eval.lock                              held while an evaluation runs (one at a time per directory)
    predictions/<task>/<run>.rank<r>.jsonl one line per sample: index, prediction, score record
    results.json, results.csv, table.md    written by :mod:`mmshiftkv.evaluation.report`
    score_vs_budget.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from filelock import FileLock, Timeout
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache, PreTrainedModel, set_seed
from transformers.utils import logging as transformers_logging

from mmshiftkv.allocators.base import budget_after_window
from mmshiftkv.cache.compat import cache_argument
from mmshiftkv.evaluation import report
from mmshiftkv.evaluation.analysis import attention_coverage, hidden_state_shift
from mmshiftkv.evaluation.tasks import TASKS, TaskSpec, get_task
from mmshiftkv.models.adapter import get_adapter
from mmshiftkv.presses import BudgetedPress
from mmshiftkv.registry import ALLOCATORS, FULL, PRESSES, make_allocator, make_press

__all__ = [
    "DTYPES",
    "EvalConfig",
    "EvalSetupError",
    "EvalSummary",
    "OutputDirBusyError",
    "PredictionStore",
    "RunSpec",
    "analyze_samples",
    "build_tasks",
    "encode_messages",
    "generate_answers",
    "load_model",
    "load_task_split",
    "make_state",
    "merge_results",
    "plan_runs",
    "quiet_weight_loading",
    "run_evaluation",
    "synthetic_conversations",
    "task_conversations",
]

#: ``--dtype`` choices; "auto" keeps the checkpoint's dtype.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def _positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


@dataclass
class EvalConfig:
    """Everything one ``mmshiftkv eval`` invocation needs.

    Parameters
    ----------
    model : str
        Hub id or local directory, loaded with ``AutoModelForImageTextToText.from_pretrained``
        and ``AutoProcessor.from_pretrained``.
    tasks : tuple of str
        lmms-eval task names (:data:`~mmshiftkv.evaluation.tasks.TASKS`), in table column order.
    presses : tuple of str
        :data:`~mmshiftkv.registry.PRESSES` names; ``"full"`` runs once per task, the others once
        per (allocator, budget).
    budgets : tuple of int
        Prompt tokens kept per KV head (the paper: 64, 128, 256, 512).
    allocators : tuple of str
        :data:`~mmshiftkv.registry.ALLOCATORS` names; ``"sparsemm"`` needs ``head_scores``.
    output_dir : str
        Where predictions and results go; rerunning with the same directory resumes.
    limit : int, optional
        Evaluate the first ``limit`` rows of each task (lmms-eval's ``--limit``).
    seed : int
        Seeds torch/numpy/random and the tasks' scoring (MMMU's random fallback).
    batch_size : int
        Samples per ``generate`` call (left-padded; the presses compress each sample on its own).
    max_new_tokens : int, optional
        Overrides every task's lmms-eval generation length (the paper used 64 for all tasks).
    dataset_org : str, optional
        Organisation of the lmms-lab dataset ids (``"lmms-lab"`` for the pre-2026 ids).
    dataset_ids, dataset_configs : dict
        Per-task ``dataset_id`` / ``dataset_config`` overrides (a local folder needs config None).
    mmmu_open_scoring : str
        ``"official"`` or ``"lmms-eval"`` (see :class:`~mmshiftkv.evaluation.tasks.MMMUTask`).
    head_scores : str, optional
        SparseMM head-score JSON file (``mmshiftkv calibrate`` writes one).
    allocator_window : int, optional
        Recent-token window of the pyramid/ada/sparsemm allocators (their default, 32, if None).
    dtype, device_map, attn_implementation : str or None
        Model loading options (``device_map="auto"`` shards a big model over the visible GPUs).
    cache_dir : str, optional
        ``datasets`` cache directory.
    max_samples_this_run : int, optional
        Stop (per process) after generating this many new samples; rerun to continue. Used to
        slice long evaluations into jobs, and by the tests to interrupt a run.
    plot : bool
        Draw ``score_vs_budget.png`` (needs matplotlib, the ``eval`` extra).
    """

    model: str
    tasks: tuple[str, ...] = tuple(TASKS)
    presses: tuple[str, ...] = ("full", "shiftkv", "snapkv", "streaming_llm", "keydiff", "expected_attention")
    budgets: tuple[int, ...] = (64, 128, 256, 512)
    allocators: tuple[str, ...] = ("uniform",)
    output_dir: str = "mmshiftkv-eval"
    limit: int | None = None
    seed: int = 0
    batch_size: int = 1
    max_new_tokens: int | None = None
    dataset_org: str | None = None
    dataset_ids: dict[str, str] = field(default_factory=dict)
    dataset_configs: dict[str, str | None] = field(default_factory=dict)
    mmmu_open_scoring: str = "official"
    head_scores: str | None = None
    allocator_window: int | None = None
    dtype: str = "auto"
    device_map: str | None = None
    attn_implementation: str | None = None
    cache_dir: str | None = None
    max_samples_this_run: int | None = None
    plot: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a hub id or a local path, got {self.model!r}")
        for name, allowed in (("tasks", TASKS), ("presses", PRESSES), ("allocators", ALLOCATORS)):
            values = tuple(getattr(self, name))
            if not values:
                raise ValueError(f"{name} must not be empty")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; choose from {', '.join(allowed)}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {list(values)}")
            setattr(self, name, values)
        self.budgets = tuple(self.budgets)
        for budget in self.budgets:
            _positive_int(budget, "each budget")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets has duplicates: {list(self.budgets)}")
        if any(p != FULL for p in self.presses) and not self.budgets:
            raise ValueError("budgets must not be empty when a press other than 'full' is evaluated")
        if "sparsemm" in self.allocators and self.head_scores is None:
            raise ValueError("the sparsemm allocator needs head_scores (--head-scores file.json)")
        for name in ("dataset_ids", "dataset_configs"):
            unknown = [t for t in getattr(self, name) if t not in TASKS]
            if unknown:
                raise ValueError(f"{name} names unknown tasks {unknown}; choose from {', '.join(TASKS)}")
        _positive_int(self.limit, "limit", allow_none=True)
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.max_new_tokens, "max_new_tokens", allow_none=True)
        _positive_int(self.max_samples_this_run, "max_samples_this_run", allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.allocator_window is not None and (
            isinstance(self.allocator_window, bool)
            or not isinstance(self.allocator_window, int)
            or self.allocator_window < 0
        ):
            raise ValueError(f"allocator_window must be an int >= 0 or None, got {self.allocator_window!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self._check_allocators()

    def _check_allocators(self) -> None:
        """Build every allocator once (reads the head-score file) and check each budget against its
        window, so a bad setting fails before any generation, not after the first runs."""
        if all(p == FULL for p in self.presses):
            return
        for name in self.allocators:
            allocator = make_allocator(name, head_scores=self.head_scores, window=self.allocator_window)
            window = getattr(allocator, "window", None)
            for budget in self.budgets if window is not None else ():
                try:
                    budget_after_window(budget, window)
                except ValueError as error:
                    raise ValueError(f"allocator {name!r}: {error} (--allocator-window)") from None

    def press_for(self, run: RunSpec) -> BudgetedPress:
        """A fresh press of ``run`` with this evaluation's allocator settings (head scores, window)."""
        allocator = None
        if run.allocator is not None:
            allocator = make_allocator(
                run.allocator, head_scores=self.head_scores, window=self.allocator_window
            )
        return make_press(run.press, budget=run.budget, allocator=allocator)

    def fingerprint(self, tasks: Mapping[str, TaskSpec]) -> dict[str, Any]:
        """What the stored predictions depend on; a resumed run must match it.

        Tasks may be added between invocations (each task's settings are checked on their own);
        presses, budgets, limit and batch size may change (batched generation equals one-by-one
        generation, and a run's file holds only its own press configuration).
        """
        return {
            "model": self.model,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "seed": self.seed,
            "head_scores": self.head_scores,
            "allocator_window": self.allocator_window,
            "tasks": {
                name: {"class": type(task).__name__, **dataclasses.asdict(task)}
                for name, task in tasks.items()
            },
        }


@dataclass(frozen=True)
class RunSpec:
    """One cell group of the results table: a task under one press configuration."""

    task: str
    press: str
    allocator: str | None = None
    budget: int | None = None

    @property
    def key(self) -> str:
        """File-name stem, e.g. ``"full"`` or ``"shiftkv__uniform__64"``."""
        return self.press if self.budget is None else f"{self.press}__{self.allocator}__{self.budget}"


def plan_runs(config: EvalConfig) -> list[RunSpec]:
    """FullKV once per task, every other press once per (allocator, budget); tasks outermost."""
    runs = []
    for task in config.tasks:
        for press in config.presses:
            if press == FULL:
                runs.append(RunSpec(task, press))
                continue
            for allocator in config.allocators:
                runs.extend(RunSpec(task, press, allocator, budget) for budget in config.budgets)
    return runs


def build_tasks(config: EvalConfig) -> dict[str, TaskSpec]:
    """The configured tasks with the dataset, seed and generation-length overrides applied.

    A ``dataset_ids`` entry naming an existing local folder gets no dataset config (a folder of
    parquet files has none) unless ``dataset_configs`` gives one.
    """
    tasks = {}
    for name in config.tasks:
        overrides: dict[str, Any] = {"seed": config.seed}
        if name in config.dataset_ids:
            overrides["dataset_id"] = config.dataset_ids[name]
            if isinstance(config.dataset_ids[name], str) and os.path.isdir(config.dataset_ids[name]):
                overrides["dataset_config"] = None
        if name in config.dataset_configs:
            overrides["dataset_config"] = config.dataset_configs[name]
        if config.max_new_tokens is not None:
            overrides["max_new_tokens"] = config.max_new_tokens
        if name == "mmmu_val":
            overrides["open_ended_scoring"] = config.mmmu_open_scoring
        tasks[name] = get_task(name, dataset_org=config.dataset_org, **overrides)
    return tasks


# ----------------------------------------------------------------------------------------------
# Model loading and generation
# ----------------------------------------------------------------------------------------------


#: How long a process may wait at a barrier for the others. Processes only meet before and after
#: the whole evaluation, and their shards may take different times; torch's default (10 min for
#: NCCL) would kill long evaluations.
BARRIER_TIMEOUT = timedelta(hours=24)


def make_state(cpu: bool = False) -> PartialState:
    """accelerate's process state; on a machine without CUDA (or with ``cpu``) processes use gloo."""
    return PartialState(cpu=cpu or not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


class EvalSetupError(ValueError):
    """The evaluation cannot start (a dataset, the model or the output directory is unusable); the
    message says why and what to do. Raised before anything is generated."""


class OutputDirBusyError(EvalSetupError):
    """Another evaluation holds the lock of the output directory."""


def _first_line(error: BaseException) -> str:
    """``"Type: first line of the message"``, without a final full stop (the caller adds a sentence)."""
    text = str(error).strip()
    line = text.splitlines()[0].rstrip(" .:") if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def load_task_split(name: str, task: TaskSpec, limit: int | None = None, cache_dir: str | None = None) -> Any:
    """``task.load(limit)`` with hub, network and file errors turned into one :class:`EvalSetupError`
    line naming the dataset and the local-folder way out."""
    try:
        return task.load(limit, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        columns = ", ".join(task.required_columns())
        raise EvalSetupError(
            f"cannot load {task.display_name} ({name}) from {task.dataset_id!r}, split {task.split!r}: "
            f"{_first_line(error)}. Without the hub, use a local copy: --dataset-id {name}=FOLDER with "
            f"FOLDER/data/{task.split}-00000-of-00001.parquet holding the columns {columns} (README: "
            "'Evaluate on your own or offline data')"
        ) from error


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" progress bar, restoring the setting after.

    The bar redraws once per weight and floods the logs of batch jobs; the evaluation's own
    progress bars are not affected.
    """
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def load_model(
    model_id: str,
    dtype: str = "auto",
    device_map: str | None = None,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` from a hub id or a local directory.

    With ``device_map`` (e.g. ``"auto"``) accelerate places the weights; otherwise the model is
    moved to ``device``. The processor pads on the left, as batched generation needs. The
    "Loading weights" progress bar is hidden (:func:`quiet_weight_loading`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_weight_loading():
            model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise EvalSetupError(
            f"cannot load the model {model_id!r}: {_first_line(error)}. Without the hub, pass --model a "
            "local directory holding the checkpoint and its processor (save_pretrained)"
        ) from error
    if device_map is None and device is not None:
        model = model.to(device)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def encode_messages(processor: Any, conversations: Sequence[list[dict]], device: torch.device) -> dict:
    """Chat-template and tokenize one conversation per sample into a left-padded batch.

    The images are taken from the conversations' ``{"type": "image", "image": PIL}`` parts, in
    order, so multi-image prompts (MMMU) keep each image at its place in the text.
    """
    texts = [
        processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        for conversation in conversations
    ]
    images = [
        part["image"]
        for conversation in conversations
        for message in conversation
        if not isinstance(message["content"], str)
        for part in message["content"]
        if part["type"] == "image"
    ]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images or None, text=texts, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in inputs.items()}


def generate_answers(
    model: PreTrainedModel, processor: Any, inputs: dict, press: BudgetedPress, max_new_tokens: int
) -> list[dict[str, Any]]:
    """Greedy generation under ``press``; per sample the decoded text and the compression facts."""
    with press(model), torch.no_grad():
        output = model.generate(
            **inputs,
            **cache_argument(model, DynamicCache()),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    stats = press.stats
    return [
        {
            "generated": text,
            "prompt_tokens": int(stats.prompt_tokens[b]),
            "kept_tokens": float(stats.kept[:, b, :].float().mean()),
        }
        for b, text in enumerate(texts)
    ]


# ----------------------------------------------------------------------------------------------
# Prediction files
# ----------------------------------------------------------------------------------------------


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


#: The fields every stored line has (written by :func:`_evaluate_run`, read by :func:`merge_results`).
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


def _merge_fingerprint(output_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------
# The evaluation loop
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalSummary:
    """What one invocation did.

    Attributes
    ----------
    computed : int
        Samples generated by this process in this invocation (resumed ones excluded).
    results : list of dict
        Aggregated results of the complete runs (main process only; empty elsewhere).
    incomplete : list of dict
        Runs with missing samples: ``{"task", "method", "done", "total"}`` (main process only).
    """

    computed: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.incomplete


def run_evaluation(
    config: EvalConfig,
    model: PreTrainedModel | None = None,
    processor: Any = None,
    state: PartialState | None = None,
) -> EvalSummary:
    """Generate and score every pending sample of every run, then merge and write the results.

    Parameters
    ----------
    config : EvalConfig
        The evaluation.
    model, processor : optional
        An already loaded model and processor; loaded from ``config.model`` when None.
    state : PartialState, optional
        accelerate's process state (:func:`make_state` when None).

    Returns
    -------
    EvalSummary
        On the main process, the complete runs' results have been written to
        ``config.output_dir`` (:func:`mmshiftkv.evaluation.report.write_results`), with the
        incomplete runs listed in ``results.json``.

    Raises
    ------
    OutputDirBusyError
        If another evaluation is running on ``config.output_dir``.
    EvalSetupError
        If a dataset or the model cannot be loaded; raised before anything is generated.
        Also when ``config.output_dir`` holds predictions of another setting, or the SparseMM
        head scores do not fit the model.
    """
    state = state if state is not None else make_state()
    if config.device_map is not None and state.num_processes > 1:
        raise EvalSetupError(
            "device_map shards one model over all GPUs of one process: run it with a single process"
        )
    if config.plot:
        report.require_matplotlib()
    with _output_dir_lock(Path(config.output_dir), state):
        return _run_locked(config, model, processor, state)


@contextlib.contextmanager
def _output_dir_lock(output_dir: Path, state: PartialState) -> Iterator[None]:
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


def _run_locked(
    config: EvalConfig, model: PreTrainedModel | None, processor: Any, state: PartialState
) -> EvalSummary:
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    tasks = build_tasks(config)
    fingerprint = config.fingerprint(tasks)
    merged = _merge_fingerprint(output_dir, fingerprint)
    store = PredictionStore(output_dir)
    runs = plan_runs(config)
    # Every process must see the same finished samples, so all read before anyone appends.
    done = {run: set(store.read(run)) for run in runs}
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(merged, indent=2), encoding="utf-8")

    datasets = {}
    for name, task in tasks.items():
        with state.main_process_first():
            datasets[name] = load_task_split(name, task, config.limit, config.cache_dir)

    if model is None:
        model, processor = load_model(
            config.model, config.dtype, config.device_map, config.attn_implementation, state.device
        )
    _check_allocators_fit(config, model)
    allowance = config.max_samples_this_run
    computed = 0
    for run in runs:
        if allowance is not None and computed >= allowance:
            break
        task, dataset = tasks[run.task], datasets[run.task]
        pending = [i for i in range(len(dataset)) if i not in done[run]]
        with state.split_between_processes(pending) as mine:
            if allowance is not None:
                mine = mine[: allowance - computed]
            computed += _evaluate_run(config, run, task, dataset, mine, model, processor, store, state)

    state.wait_for_everyone()
    summary = EvalSummary(computed=computed)
    if state.is_main_process:
        sizes = {name: len(dataset) for name, dataset in datasets.items()}
        summary.results, summary.incomplete = merge_results(store, runs, tasks, sizes)
        if summary.results:
            report.write_results(
                summary.results, output_dir, config.budgets, plot=config.plot, incomplete=summary.incomplete
            )
    return summary


def _check_allocators_fit(config: EvalConfig, model: PreTrainedModel) -> None:
    """Bind every configured allocator to the model's shape (SparseMM head scores made for another
    model fail here, before the first generation)."""
    if all(p == FULL for p in config.presses):
        return
    adapter = get_adapter(model)
    for name in config.allocators:
        allocator = make_allocator(name, head_scores=config.head_scores, window=config.allocator_window)
        try:
            allocator.bind(adapter.n_layers, adapter.n_heads, adapter.n_kv_heads)
        except ValueError as error:
            raise EvalSetupError(f"allocator {name!r} does not fit {config.model!r}: {error}") from None


def _evaluate_run(
    config: EvalConfig,
    run: RunSpec,
    task: TaskSpec,
    dataset: Any,
    indices: Sequence[int],
    model: PreTrainedModel,
    processor: Any,
    store: PredictionStore,
    state: PartialState,
) -> int:
    if not indices:
        return 0
    label = report.method_label(run.press, run.allocator)
    budget = "" if run.budget is None else f" B={run.budget}"
    progress = tqdm(
        total=len(indices),
        desc=f"{task.display_name} | {label}{budget}",
        disable=not state.is_main_process,
        dynamic_ncols=True,
    )
    with store.writer(run, state.process_index) as write, progress:
        for start in range(0, len(indices), config.batch_size):
            batch = list(indices[start : start + config.batch_size])
            rows = [dataset[i] for i in batch]
            inputs = encode_messages(processor, [task.build_messages(row) for row in rows], model.device)
            press = config.press_for(run)
            answers = generate_answers(model, processor, inputs, press, task.max_new_tokens)
            for index, row, answer in zip(batch, rows, answers):
                prediction = task.postprocess(answer["generated"])
                write(
                    {
                        "index": index,
                        "prediction": prediction,
                        **answer,
                        "record": task.score(prediction, row),
                    }
                )
            progress.update(len(batch))
    return len(indices)


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


# ----------------------------------------------------------------------------------------------
# Fig. 1 over several samples (``mmshiftkv analyze``)
# ----------------------------------------------------------------------------------------------

SYNTHETIC_QUESTION = "What is written in the picture? Describe every detail you can read."


def synthetic_conversations(n: int, image_size: int = 448, seed: int = 0) -> list[list[dict]]:
    """``n`` one-turn conversations: a seeded noise image with a few flat boxes, and a question."""
    conversations = []
    for i in range(n):
        rng = np.random.RandomState(seed + i)
        pixels = (rng.rand(image_size, image_size, 3) * 255).astype("uint8")
        for _ in range(4):
            x, y = rng.randint(0, max(image_size - image_size // 4, 1), size=2)
            pixels[y : y + image_size // 4, x : x + image_size // 4] = rng.randint(0, 255, size=3)
        image = Image.fromarray(pixels)
        content = [{"type": "image", "image": image}, {"type": "text", "text": SYNTHETIC_QUESTION}]
        conversations.append([{"role": "user", "content": content}])
    return conversations


def task_conversations(
    task: str, n: int, dataset_org: str | None = None, cache_dir: str | None = None, **overrides: Any
) -> list[list[dict]]:
    """The prompts (chat messages) of the first ``n`` samples of a task."""
    spec = get_task(task, dataset_org=dataset_org, **overrides)
    return [spec.build_messages(row) for row in load_task_split(task, spec, n, cache_dir)]


def analyze_samples(
    model: PreTrainedModel,
    processor: Any,
    conversations: Sequence[list[dict]],
    presses: Sequence[str],
    budget: int,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Fig. 1 over several prompts, one at a time.

    Returns
    -------
    dict
        ``hidden_state_shift``: per layer, the prefill/decode mean and std of the attention input
        (:func:`~mmshiftkv.evaluation.analysis.hidden_state_shift`), averaged over the samples.
        ``coverage``: per press, ``distribution`` (one value per sample and decode step: the
        coverage averaged over layers and KV heads), its ``mean`` and population ``std``,
        ``per_layer`` and ``per_sample`` means
        (:func:`~mmshiftkv.evaluation.analysis.attention_coverage`).
    """
    shifts: list[list[Any]] = []
    per_step: dict[str, list[torch.Tensor]] = {name: [] for name in presses}
    for conversation in tqdm(conversations, desc="Fig. 1 samples", dynamic_ncols=True):
        inputs = encode_messages(processor, [conversation], model.device)
        shifts.append(hidden_state_shift(model, inputs, max_new_tokens))
        for name in presses:
            press = make_press(name, budget=budget)
            per_step[name].append(attention_coverage(model, inputs, press, max_new_tokens).per_step)
    stats = ("prefill_mean", "prefill_std", "decode_mean", "decode_std")
    layers = [
        {
            "layer": layer,
            **{s: statistics.fmean(getattr(sample[layer], s) for sample in shifts) for s in stats},
        }
        for layer in range(len(shifts[0]))
    ]
    for row in layers:
        row["std_ratio"] = row["decode_std"] / row["prefill_std"] if row["prefill_std"] else math.nan
    coverage = {}
    for name, tensors in per_step.items():
        # each tensor: (steps, layers, batch=1, kv_heads)
        distribution = [float(v) for t in tensors for v in t.mean(dim=(1, 2, 3))]
        coverage[name] = {
            "mean": statistics.fmean(distribution),
            "std": statistics.pstdev(distribution),
            "per_layer": torch.stack([t.mean(dim=(0, 2, 3)) for t in tensors]).mean(0).tolist(),
            "per_sample": [float(t.mean()) for t in tensors],
            "distribution": distribution,
        }
    return {
        "num_samples": len(conversations),
        "budget": budget,
        "max_new_tokens": max_new_tokens,
        "hidden_state_shift": layers,
        "coverage": coverage,
    }
