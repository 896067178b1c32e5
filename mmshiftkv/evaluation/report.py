"""Result files of the evaluation, analysis and profiling commands: JSON, CSV, markdown, plots.

The markdown table follows the paper's Table 1: one row per method and budget (FullKV once, it
has no budget), one column per task in the paper's order, and Avg, the arithmetic mean of the
row's task columns. Scores are on the tables' 0-100 scale (:func:`table_score`).

Plots use matplotlib (the ``eval`` extra) with the non-interactive Agg backend.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmshiftkv.evaluation.tasks import TASKS

__all__ = [
    "ALLOCATOR_LABELS",
    "PRESS_LABELS",
    "markdown_table",
    "method_label",
    "plot_coverage",
    "plot_hidden_state_shift",
    "plot_profile",
    "plot_score_vs_budget",
    "require_matplotlib",
    "table_score",
    "write_results",
]

#: Row names of the paper's tables.
PRESS_LABELS = {
    "full": "FullKV",
    "shiftkv": "MM-ShiftKV",
    "snapkv": "SnapKV",
    "streaming_llm": "StreamingLLM",
    "keydiff": "KeyDiff",
    "expected_attention": "ExpectedAttn",
    "last_attn": "LastAttn",
    "vlcache": "VL-Cache",
    "lookm": "LOOK-M",
    "mixkv": "MixKV",
}
#: Allocation names of the paper's Table 3 (uniform allocation is the unnamed default).
ALLOCATOR_LABELS = {
    "uniform": "",
    "pyramid": "PyramidKV",
    "ada": "AdaKV",
    "sparsemm": "SparseMM",
    "meda": "MEDA",
    "vlcache": "VL-Cache",
}


def method_label(press: str, allocator: str | None = None) -> str:
    """``"SnapKV"``, or ``"PyramidKV + MM-ShiftKV"`` for a non-uniform allocation."""
    name = PRESS_LABELS.get(press, press)
    allocation = ALLOCATOR_LABELS.get(allocator, allocator) if allocator else ""
    return f"{allocation} + {name}" if allocation else name


def table_score(task: str, metrics: Mapping[str, float]) -> float:
    """The task's score on the paper's 0-100 scale.

    OCRBench reports the number correct (out of 1000 on the full benchmark); the tables show it
    as a percentage of the questions evaluated. Every other task already reports 0-100.
    """
    if task == "ocrbench":
        return 100.0 * metrics["score"] / metrics["num_samples"]
    return float(metrics["score"])


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "plots need matplotlib: pip install 'mmshiftkv[eval]' (or pass --no-plot)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _task_order(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The paper's tasks in the paper's order, then any other panel names in order of appearance."""
    present = list(dict.fromkeys(r["task"] for r in results))
    return [name for name in TASKS if name in present] + [name for name in present if name not in TASKS]


def _display_name(task: str) -> str:
    return TASKS[task].display_name if task in TASKS else task


def _rows(results: Sequence[Mapping[str, Any]], budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    """(method, budget) rows: FullKV first, then per budget the methods in order of appearance."""
    methods = list(dict.fromkeys(r["method"] for r in results if r["budget"] is not None))
    rows: list[tuple[str, int | None]] = (
        [(PRESS_LABELS["full"], None)] if any(r["budget"] is None for r in results) else []
    )
    present = {(r["method"], r["budget"]) for r in results}
    for budget in budgets:
        rows += [(method, budget) for method in methods if (method, budget) in present]
    return rows


def markdown_table(results: Sequence[Mapping[str, Any]], budgets: Sequence[int]) -> str:
    """The paper's Table 1 layout as a markdown table (see the module docstring).

    A cell is empty where its run is missing; Avg is empty unless the row has every task.
    """
    tasks = _task_order(results)
    by_cell = {(r["method"], r["budget"], r["task"]): r["table_score"] for r in results}
    header = ["Method", "Budget", *[_display_name(name) for name in tasks], "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(tasks) + 1)]
    for method, budget in _rows(results, budgets):
        scores = [by_cell.get((method, budget, name)) for name in tasks]
        avg = None if None in scores else math.fsum(scores) / len(scores)
        cells = [method, "-" if budget is None else str(budget)]
        cells += ["" if s is None else f"{s:.1f}" for s in [*scores, avg]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    results: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    budgets: Sequence[int],
    plot: bool = True,
    incomplete: Sequence[Mapping[str, Any]] = (),
) -> list[Path]:
    """Write ``results.json``, ``results.csv``, ``table.md`` and ``score_vs_budget.png``.

    ``results.json`` also lists the ``incomplete`` runs (left out of every file) of a run that
    stopped early, so a partial table is never mistaken for a full one.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / name for name in ("results.json", "results.csv", "table.md")]
    payload = {"results": list(results), "incomplete": list(incomplete)}
    paths[0].write_text(json.dumps(payload, indent=2), encoding="utf-8")
    columns = [
        "task",
        "method",
        "press",
        "allocator",
        "budget",
        "score",
        "table_score",
        "num_samples",
        "mean_prompt_tokens",
        "mean_kept_tokens",
    ]
    with open(paths[1], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    paths[2].write_text(markdown_table(results, budgets), encoding="utf-8")
    if plot:
        paths.append(plot_score_vs_budget(results, output_dir / "score_vs_budget.png"))
    return paths


def _grid(plt: Any, n: int, width: float = 3.6, height: float = 2.8) -> tuple[Any, list[Any]]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_score_vs_budget(
    results: Sequence[Mapping[str, Any]], path: str | Path, average: bool = True, ylabel: str = "score"
) -> Path:
    """One panel per task (and Avg when ``average`` and several tasks are there): score vs budget
    per method, FullKV as a dashed horizontal line.

    ``results`` rows need ``task``, ``method``, ``budget`` (None for FullKV) and ``table_score``;
    a ``task`` outside the paper's tasks is a panel titled with its name.
    """
    plt = require_matplotlib()
    tasks = _task_order(results)
    panels = [(_display_name(name), name) for name in tasks] + (
        [("Avg", None)] if average and len(tasks) > 1 else []
    )
    methods = list(dict.fromkeys(r["method"] for r in results if r["budget"] is not None))
    all_budgets = sorted({r["budget"] for r in results if r["budget"] is not None})
    fig, axes = _grid(plt, len(panels))
    for ax, (title, name) in zip(axes, panels):
        for method in [PRESS_LABELS["full"], *methods]:
            points = _series(results, method, name, tasks)
            if not points:
                continue
            if method == PRESS_LABELS["full"] and None in points:
                ax.axhline(points[None], color="black", linestyle="--", label=method)
                continue
            budgets = sorted(b for b in points if b is not None)
            ax.plot(budgets, [points[b] for b in budgets], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_budgets, [str(b) for b in all_budgets], minor=False)
        ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("budget (tokens / KV head)")
        ax.set_ylabel(ylabel)
    # Beside the first row rather than over a panel: with many methods an inner legend hides lines.
    first_row = axes[: min(len(axes), 4)]
    first_row[-1].legend(
        *axes[0].get_legend_handles_labels(), fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _series(
    results: Sequence[Mapping[str, Any]], method: str, task: str | None, tasks: Sequence[str]
) -> dict[int | None, float]:
    """budget -> score of ``method`` on ``task`` (None: the mean over ``tasks``, where complete)."""
    cells: dict[int | None, dict[str, float]] = {}
    for r in results:
        if r["method"] == method:
            cells.setdefault(r["budget"], {})[r["task"]] = r["table_score"]
    if task is not None:
        return {b: scores[task] for b, scores in cells.items() if task in scores}
    return {b: math.fsum(s.values()) / len(s) for b, s in cells.items() if set(s) == set(tasks)}


def plot_hidden_state_shift(shifts: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Fig. 1a: per-layer mean and std of the attention input, prefill vs decoding."""
    plt = require_matplotlib()
    layers = [s["layer"] for s in shifts]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, stat in zip(axes, ("mean", "std")):
        for phase, style in (("prefill", "-o"), ("decode", "-s")):
            ax.plot(layers, [s[f"{phase}_{stat}"] for s in shifts], style, markersize=3, label=phase)
        ax.set_xlabel("layer")
        ax.set_title(f"hidden-state {stat}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_coverage(coverage: Mapping[str, Mapping[str, Any]], path: str | Path, budget: int) -> Path:
    """Fig. 1b: distribution of the per-step attention coverage of each press (box plot)."""
    plt = require_matplotlib()
    names = list(coverage)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.2))
    ax.boxplot([coverage[name]["distribution"] for name in names])
    ax.set_xticks(range(1, len(names) + 1), [PRESS_LABELS.get(n, n) for n in names], rotation=20)
    ax.set_ylabel("attention mass on kept prompt tokens")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"decode attention coverage, budget {budget}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_profile(points: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Fig. 3: decode ms/token (bars) and peak memory (lines) vs input length, per press."""
    plt = require_matplotlib()
    presses = list(dict.fromkeys(p["method"] for p in points))
    lengths = sorted({p["input_length"] for p in points})
    by_key = {(p["method"], p["input_length"]): p for p in points}
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) * max(len(presses), 2) / 2 + 3, 3.6))
    memory_ax = ax.twinx()
    width = 0.8 / len(presses)
    for i, method in enumerate(presses):
        xs = [j + (i - (len(presses) - 1) / 2) * width for j in range(len(lengths))]
        cells = [by_key.get((method, n)) for n in lengths]
        ax.bar(
            xs, [c["decode_ms_per_token"] if c else 0.0 for c in cells], width, color=f"C{i}", label=method
        )
        memory = [c["peak_memory_bytes"] / 2**30 if c and c["peak_memory_bytes"] else math.nan for c in cells]
        memory_ax.plot(range(len(lengths)), memory, marker="o", color=f"C{i}")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("decode ms / token (median)")
    memory_ax.set_ylabel("peak memory (GiB)")
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
