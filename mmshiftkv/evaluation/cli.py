"""Command lines of ``mmshiftkv eval``, ``mmshiftkv analyze`` and ``mmshiftkv profile``.

``python -m mmshiftkv.evaluation`` is ``mmshiftkv eval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mmshiftkv.evaluation import profiling, report
from mmshiftkv.evaluation.analysis import analyze_samples, synthetic_conversations, task_conversations
from mmshiftkv.evaluation.config import EvalConfig
from mmshiftkv.evaluation.runner import make_state, run_evaluation
from mmshiftkv.evaluation.tasks import TASKS
from mmshiftkv.generation import DTYPES, EvalSetupError, load_model
from mmshiftkv.registry import ALLOCATORS, PRESSES


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _names(value))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from error


def _task_values(pairs: Sequence[str], option: str, parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """``TASK=VALUE`` pairs; an empty VALUE means None (e.g. no dataset config for a local folder)."""
    values: dict[str, str | None] = {}
    for pair in pairs:
        task, sep, value = pair.partition("=")
        if not sep or task not in TASKS:
            parser.error(f"{option} takes TASK=VALUE with TASK one of {', '.join(TASKS)}, got {pair!r}")
        values[task] = value or None
    return values


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF hub id or local directory of a VLM checkpoint")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="default: the checkpoint's")
    parser.add_argument(
        "--device-map", default=None, help="e.g. 'auto' to shard a model bigger than one GPU (one process)"
    )
    parser.add_argument("--attn-implementation", default=None, help="sdpa, eager, flash_attention_2, ...")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is visible")


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmshiftkv eval",
        description="Evaluate presses x allocators x budgets on the paper's benchmarks (Tables 1-3). "
        "Resumable: rerun the same command to continue. Data-parallel under accelerate/torchrun.",
    )
    _add_model_options(parser)
    parser.add_argument(
        "--presses",
        type=_names,
        default="full,shiftkv,snapkv,streaming_llm,keydiff,expected_attention",
        help=f"comma list of {', '.join(PRESSES)}; 'full' runs once, without budget",
    )
    parser.add_argument("--budgets", type=_ints, default="64,128,256,512", help="tokens per KV head")
    parser.add_argument(
        "--allocators", type=_names, default="uniform", help=f"comma list of {', '.join(ALLOCATORS)}"
    )
    parser.add_argument("--head-scores", default=None, help="SparseMM head-score JSON (mmshiftkv calibrate)")
    parser.add_argument(
        "--redundancy",
        default=None,
        help="MixKV redundancy JSON (mmshiftkv calibrate --scores redundancy): mixkv mixes head-wise",
    )
    parser.add_argument("--allocator-window", type=int, default=None, help="window of pyramid/ada/sparsemm")
    parser.add_argument(
        "--tasks", type=_names, default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="override every task's lmms-eval generation length (the paper used 64)",
    )
    parser.add_argument("--output-dir", default="mmshiftkv-eval")
    parser.add_argument(
        "--dataset-org",
        default=None,
        help="organisation of the lmms-lab dataset ids, e.g. lmms-lab (pre-2026 ids)",
    )
    parser.add_argument(
        "--dataset-id",
        action="append",
        default=[],
        metavar="TASK=ID",
        help="per-task dataset id or local folder (repeatable)",
    )
    parser.add_argument(
        "--dataset-config",
        action="append",
        default=[],
        metavar="TASK=NAME",
        help="per-task dataset config; TASK= for none (repeatable)",
    )
    parser.add_argument("--cache-dir", default=None, help="datasets cache directory")
    parser.add_argument("--mmmu-open-scoring", default="official", choices=["official", "lmms-eval"])
    parser.add_argument(
        "--max-samples-this-run",
        type=int,
        default=None,
        help="stop after N new samples per process (rerun to continue)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip score_vs_budget.png")
    return parser


def eval_main(argv: Sequence[str] | None = None) -> int:
    parser = eval_parser()
    args = parser.parse_args(argv)
    try:
        config = EvalConfig(
            model=args.model,
            tasks=args.tasks,
            presses=args.presses,
            budgets=args.budgets,
            allocators=args.allocators,
            output_dir=args.output_dir,
            limit=args.limit,
            seed=args.seed,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            dataset_org=args.dataset_org,
            dataset_ids=_task_values(args.dataset_id, "--dataset-id", parser),
            dataset_configs=_task_values(args.dataset_config, "--dataset-config", parser),
            mmmu_open_scoring=args.mmmu_open_scoring,
            head_scores=args.head_scores,
            redundancy=args.redundancy,
            allocator_window=args.allocator_window,
            dtype=args.dtype,
            device_map=args.device_map,
            attn_implementation=args.attn_implementation,
            cache_dir=args.cache_dir,
            max_samples_this_run=args.max_samples_this_run,
            plot=not args.no_plot,
        )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    state = make_state(cpu=args.cpu)
    try:
        summary = run_evaluation(config, state=state)
    except EvalSetupError as error:
        # setup problems (hub, files, output directory) surface before any generation: one line each
        return _fail(parser, error)
    if state.is_main_process:
        if summary.results:
            print((Path(config.output_dir) / "table.md").read_text(encoding="utf-8"))
        for run in summary.incomplete:
            budget = "" if run["budget"] is None else f" B={run['budget']}"
            print(f"incomplete: {run['task']} {run['method']}{budget}: {run['done']}/{run['total']} samples")
        if summary.incomplete:
            print("rerun the same command to resume")
    state.wait_for_everyone()
    return 0


def _fail(parser: argparse.ArgumentParser, error: Exception) -> int:
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    return 1


def analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmshiftkv analyze",
        description="Fig. 1: (a) hidden-state mean/std per layer in prefill vs decoding, (b) the share of "
        "each decode step's prompt attention that falls on the tokens a press keeps.",
    )
    _add_model_options(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--task", choices=list(TASKS), help="take the samples from this task (default: synthetic)"
    )
    source.add_argument("--synthetic", action="store_true", help="noise images + a fixed question (default)")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--dataset-id", default=None, help="dataset id or local folder of --task")
    parser.add_argument("--dataset-config", default=None, help="dataset config of --task ('' for none)")
    parser.add_argument("--dataset-org", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--image-size", type=int, default=448, help="side of the synthetic images")
    parser.add_argument(
        "--presses", type=_names, default="full,shiftkv,snapkv,streaming_llm,keydiff,expected_attention"
    )
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="mmshiftkv-analysis")
    parser.add_argument("--no-plot", action="store_true")
    return parser


def analyze_main(argv: Sequence[str] | None = None) -> int:
    parser = analyze_parser()
    args = parser.parse_args(argv)
    presses = args.presses
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        parser.error(f"unknown press(es) {unknown}; choose from {', '.join(PRESSES)}")
    if args.num_samples < 1 or args.budget < 1 or args.max_new_tokens < 2:
        parser.error("--num-samples and --budget must be >= 1, --max-new-tokens >= 2")
    plot = not args.no_plot
    if plot:
        report.require_matplotlib()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    try:
        model, processor = load_model(
            args.model, args.dtype, args.device_map, args.attn_implementation, device
        )
        if args.task is not None:
            overrides = {} if args.dataset_id is None else {"dataset_id": args.dataset_id}
            if args.dataset_config is not None:
                overrides["dataset_config"] = args.dataset_config or None
            conversations = task_conversations(
                args.task, args.num_samples, args.dataset_org, args.cache_dir, **overrides
            )
            source = f"task:{args.task}"
        else:
            conversations = synthetic_conversations(args.num_samples, args.image_size, args.seed)
            source = "synthetic"
    except EvalSetupError as error:
        return _fail(parser, error)
    result = analyze_samples(model, processor, conversations, presses, args.budget, args.max_new_tokens)
    result = {"model": args.model, "source": source, **result}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "fig1.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if plot:
        report.plot_hidden_state_shift(
            result["hidden_state_shift"], output_dir / "fig1a_hidden_state_shift.png"
        )
        report.plot_coverage(result["coverage"], output_dir / "fig1b_attention_coverage.png", args.budget)
    for name, cov in result["coverage"].items():
        print(f"{report.method_label(name):<14} coverage mean {cov['mean']:.3f}  std {cov['std']:.3f}")
    return 0


def profile_main(argv: Sequence[str] | None = None) -> int:
    return profiling.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmshiftkv.evaluation``: the eval command."""
    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())
