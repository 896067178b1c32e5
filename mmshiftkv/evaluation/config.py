"""What one ``mmshiftkv eval`` invocation runs: its configuration, its runs and their tasks.

One evaluation is a grid of *runs*: (task, press, allocator, budget), with FullKV run once per task
(it has no budget). :class:`EvalConfig` is checked when it is built (names, budgets against the
allocators' windows, the head-score file), :func:`plan_runs` lists the runs, :func:`build_tasks`
applies the configuration's dataset and generation overrides to the tasks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmshiftkv.allocators.base import budget_after_window
from mmshiftkv.evaluation.tasks import TASKS, TaskSpec, get_task
from mmshiftkv.generation import DTYPES, EvalSetupError, first_line
from mmshiftkv.presses import BudgetedPress
from mmshiftkv.registry import ALLOCATORS, FULL, PRESSES, make_allocator, make_press

#: The press that reads the ``redundancy`` file.
MIXKV = "mixkv"


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
    redundancy : str, optional
        MixKV redundancy JSON file (``mmshiftkv calibrate --scores redundancy`` writes one): the
        ``"mixkv"`` press then mixes head-wise (without it, its uniform mix).
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
    redundancy: str | None = None
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
        if self.redundancy is not None and MIXKV not in self.presses:
            raise ValueError(
                f"redundancy (--redundancy) is read by the {MIXKV!r} press only: add {MIXKV!r} to presses"
            )
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
        fields = {"redundancy": self.redundancy} if run.press == MIXKV and self.redundancy is not None else {}
        return make_press(run.press, budget=run.budget, allocator=allocator, **fields)

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
            # Only when given: output directories written before the option resume as before.
            **({"redundancy": self.redundancy} if self.redundancy is not None else {}),
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


def load_task_split(name: str, task: TaskSpec, limit: int | None = None, cache_dir: str | None = None) -> Any:
    """``task.load(limit)`` with hub, network and file errors turned into one :class:`EvalSetupError`
    line naming the dataset and the local-folder way out."""
    try:
        return task.load(limit, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        columns = ", ".join(task.required_columns())
        raise EvalSetupError(
            f"cannot load {task.display_name} ({name}) from {task.dataset_id!r}, split {task.split!r}: "
            f"{first_line(error)}. Without the hub, use a local copy: --dataset-id {name}=FOLDER with "
            f"FOLDER/data/{task.split}-00000-of-00001.parquet holding the columns {columns} (README: "
            "'Evaluate on your own or offline data')"
        ) from error
