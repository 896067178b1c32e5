"""GPU acceptance run: one command on a bare CUDA machine, one JSON report, under 8 minutes.

    python benchmarks/gpu_acceptance.py [--report gpu_acceptance.json] [--wheels DIR]
    python benchmarks/gpu_acceptance.py --dry-run        # print the plan (steps, commands, time caps)
    python benchmarks/gpu_acceptance.py --cpu            # the same steps at toy sizes on the CPU

Needs torch (a CUDA build), transformers, ninja, nvcc (CUDA_HOME or the `nvcc` on PATH) and no
network. The project is installed from this working tree with
``pip install --no-build-isolation --no-deps -e .``, so its other runtime dependencies must already
be installed: accelerate, datasets, pillow, tqdm (pulled in by transformers / datasets on most
machines) and pytest for the op tests; kvpress and flash-attn are optional. Whatever of these is
missing is installed from ``--wheels DIR`` (``pip install --no-index --find-links DIR``) when
given; the ``environment`` step lists what is present. Small wheels to carry for a bare machine:
``pytest`` (+ ``iniconfig``, ``pluggy``, ``packaging``), ``hypothesis`` (+ ``sortedcontainers``),
``accelerate``, ``ninja``, and ``kvpress`` for the interop tests.

Steps (each a subprocess with its own time cap, all within --time-budget seconds):

1. ``environment``: versions, GPU, which optional packages import.
2. ``install``: builds the project and its CUDA op (FORCE_CUDA=1, this GPU's architecture only).
3. ``op_tests``: tests/test_ops_*.py; with a GPU visible they run on CUDA as well as the CPU.
4. ``op_vs_reference``: benchmarks/bench_shiftkv_op.py at 7B dimensions, 4K-32K.
5. ``scoring_overhead``: benchmarks/bench_shiftkv_overhead.py on the GPU, bfloat16, 4K-32K: ShiftKV's
   and SnapKV's scoring against one 7B layer's prefill and ShiftKV's against the bare logits GEMMs
   (``scoring_over_floor``, ``op_over_floor``), the op's votes checked against the float64 reference
   on the same inputs (``votes_differing_beyond_margin`` must be 0).
6. ``generate``: ``generate`` under every press on a tiny model of every family, with sdpa and
   (when importable) flash-attention 2; FullKV must reproduce plain ``generate``.
7. ``headwise_decode``: benchmarks/bench_headwise_decode.py.
8. ``profile``: ``mmshiftkv profile`` with 2 layers of 7B dimensions at 2K-32K.

The report holds every step's command, exit status, seconds, the JSON it printed (if any) and the
tail of its output. A step that fails does not stop the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
OPTIONAL_PACKAGES = ("kvpress", "flash_attn", "hypothesis", "matplotlib")
REQUIRED_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "PIL", "tqdm", "pytest")
WHEEL_NAMES = {"PIL": "pillow"}
TAIL_CHARS = 4000


@dataclass
class Step:
    name: str
    command: list[str]
    cap_s: int
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    command: list[str]
    cap_s: int
    status: str  # "passed", "failed", "timed out", "skipped", "planned"
    seconds: float = 0.0
    returncode: int | None = None
    output_json: object = None
    output_tail: str = ""


def _python(*arguments: str) -> list[str]:
    return [sys.executable, *arguments]


def plan(cpu: bool, install: bool, output_dir: Path) -> list[Step]:
    """The steps of a run; ``cpu`` shrinks every size so the plan runs in a minute or two on a CPU."""
    steps = [Step("environment", _python(__file__, "--step", "environment"), 20)]
    if install:
        env = {"FORCE_CUDA": "0" if cpu else "1"}
        import torch

        if not cpu and torch.cuda.is_available():  # this GPU's architecture only: faster to compile
            env["TORCH_CUDA_ARCH_LIST"] = ".".join(map(str, torch.cuda.get_device_capability()))
        command = _python("-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT))
        steps.append(Step("install", command, 125, env))
    # Every op test file but this script's own (which runs the script).
    tests = sorted((ROOT / "tests").glob("test_ops_*.py"))
    op_tests = [str(path) for path in tests if "gpu" not in path.name]
    steps.append(
        Step("op_tests", _python("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *op_tests), 85)
    )
    if cpu:
        op_bench = ["--device", "cpu", "--lengths", "128", "--repeats", "1", "--dtypes", "float32"]
        overhead = ["--device", "cpu", "--lengths", "128", "--repeats", "1", "--dtypes", "float32"]
        decode = ["--device", "cpu", "--contexts", "256", "--budget", "16", "--layers", "1", "--steps", "1"]
        decode += ["--repeats", "1"]
        profile = ["--layers", "1", "--lengths", "256", "--decode-tokens", "2", "--presses", "shiftkv,snapkv"]
        profile += ["--budget", "16", "--dtype", "float32", "--device", "cpu"]
    else:
        op_bench = ["--device", "cuda", "--lengths", "4096", "16384", "32768", "--repeats", "5"]
        op_bench += ["--dtypes", "bfloat16", "float32"]
        overhead = ["--device", "cuda", "--lengths", "4096,16384,32768", "--repeats", "3"]
        overhead += ["--dtypes", "bfloat16"]
        decode = [
            "--device",
            "cuda",
            "--contexts",
            "2048",
            "8192",
            "32768",
            "--budget",
            "512",
            "--repeats",
            "5",
        ]
        profile = ["--layers", "2", "--lengths", "2048,8192,16384,32768", "--decode-tokens", "32"]
        profile += ["--budget", "256", "--device", "cuda"]
    steps += [
        Step("op_vs_reference", _python(str(ROOT / "benchmarks" / "bench_shiftkv_op.py"), *op_bench), 45),
        Step("scoring_overhead", _python(str(BENCHMARKS / "bench_shiftkv_overhead.py"), *overhead), 40),
        Step("generate", _python(__file__, "--step", "generate", *(["--cpu"] if cpu else [])), 60),
        Step("headwise_decode", _python(str(ROOT / "benchmarks" / "bench_headwise_decode.py"), *decode), 40),
        Step(
            "profile",
            _python("-m", "mmshiftkv.cli", "profile", *profile, "--no-plot", "--output-dir", str(output_dir)),
            55,
        ),
    ]
    return steps


def _last_json(text: str) -> object:
    """The last JSON document a step printed (a whole-output object, or its last JSON line)."""
    start = text.rfind("\n{\n")
    candidates = [text[start + 1 :]] if start >= 0 else []
    candidates += [line for line in reversed(text.splitlines()) if line.startswith("{")]
    if text.startswith("{"):
        candidates.insert(0, text)
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


def run_step(step: Step, seconds_left: float, time_scale: float = 1.0) -> StepResult:
    cap = int(min(step.cap_s * time_scale, seconds_left))
    result = StepResult(step.name, step.command, cap, "skipped")
    if cap < 5:
        result.output_tail = "no time left in the run's budget"
        return result
    start = time.perf_counter()
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired as error:
        # A timed-out run's captured output comes back as bytes even with text=True.
        parts = (error.stdout, error.stderr)
        output = "".join(p.decode(errors="replace") if isinstance(p, bytes) else p or "" for p in parts)
        result.status, result.output_tail = "timed out", output[-TAIL_CHARS:]
    else:
        result.returncode = done.returncode
        result.status = "passed" if done.returncode == 0 else "failed"
        result.output_json = _last_json(done.stdout.strip())
        result.output_tail = (done.stdout + done.stderr)[-TAIL_CHARS:]
    result.seconds = round(time.perf_counter() - start, 1)
    return result


# ---------------------------------------------------------------------------------------------
# Steps that run inside this script (--step NAME).


def environment_step() -> dict:
    import torch
    import transformers

    present = {
        name: importlib.util.find_spec(name) is not None for name in REQUIRED_PACKAGES + OPTIONAL_PACKAGES
    }
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "cuda_home": os.environ.get("CUDA_HOME"),
        "packages": present,
        "missing_required": [name for name in REQUIRED_PACKAGES if not present[name]],
    }


def _prompt_inputs(processor, device: str) -> dict:
    import numpy as np
    from PIL import Image

    question = "Describe the picture in a few words, then say what colour dominates it and why."
    if not hasattr(processor, "image_processor"):  # a text model's tokenizer
        return {k: v.to(device) for k, v in processor([question * 2], return_tensors="pt").items()}
    pixels = np.random.default_rng(0).integers(0, 255, (84, 112, 3), dtype=np.uint8)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[Image.fromarray(pixels)], text=[text], return_tensors="pt")
    return {k: v.to(device) for k, v in inputs.items()}


def generate_step(cpu: bool) -> dict:
    """``generate`` under every press, every family, sdpa (+ flash-attention 2): which ran, which matched."""
    import torch

    from mmshiftkv.registry import PRESSES
    from mmshiftkv.testing import FAMILIES, build_tiny_model

    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    implementations = ["sdpa"]
    if not cpu and importlib.util.find_spec("flash_attn") is not None:
        implementations.append("flash_attention_2")
    runs, failures = [], []
    for family in FAMILIES:
        for implementation in implementations:
            model, processor = build_tiny_model(family, implementation, dtype=dtype)
            model.to(device)
            inputs = _prompt_inputs(processor, device)
            options = {"max_new_tokens": 4, "do_sample": False}
            with torch.no_grad():
                plain = model.generate(**inputs, **options)
            for name, press_class in PRESSES.items():
                entry = {"family": family, "attn": implementation, "press": name}
                try:
                    press = press_class() if name == "full" else press_class(budget=8)
                    with torch.no_grad(), press(model):
                        output = model.generate(**inputs, **options)
                    entry["new_tokens"] = int(output.shape[1] - inputs["input_ids"].shape[1])
                    if name == "full":
                        entry["equals_plain_generate"] = bool(torch.equal(output, plain))
                        if not entry["equals_plain_generate"]:
                            failures.append(entry)
                except Exception as error:  # every press x family is reported, not the first failure
                    entry["error"] = f"{type(error).__name__}: {error}"[:300]
                    failures.append(entry)
                runs.append(entry)
            del model
    return {
        "device": device,
        "dtype": str(dtype),
        "attn": implementations,
        "runs": runs,
        "failures": failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default="gpu_acceptance.json", help="where the JSON report is written")
    parser.add_argument(
        "--cpu", action="store_true", help="toy sizes on the CPU (a smoke test of this script)"
    )
    parser.add_argument("--dry-run", action="store_true", help="write the plan without running it")
    parser.add_argument("--no-install", action="store_true", help="use the installed project as it is")
    parser.add_argument("--wheels", default=None, help="folder of wheels for missing packages (no index)")
    parser.add_argument("--only", default=None, help="comma-separated step names to run")
    parser.add_argument("--time-budget", type=float, default=470.0, help="seconds for the whole run")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply every step's cap (a slow or shared machine)"
    )
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step is not None:
        result = environment_step() if args.step == "environment" else generate_step(args.cpu)
        print(json.dumps(result, indent=2))
        return 1 if result.get("failures") or result.get("missing_required") else 0

    if not (args.cpu or args.dry_run):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU is visible: run on a GPU machine, or use --cpu / --dry-run")
    started = time.perf_counter()
    output_dir = Path(tempfile.mkdtemp(prefix="mmshiftkv-gpu-acceptance-"))
    steps = plan(args.cpu, install=not (args.no_install or args.cpu), output_dir=output_dir)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {step.name for step in steps}
        if unknown:
            raise SystemExit(f"unknown steps {sorted(unknown)}; planned: {[step.name for step in steps]}")
        steps = [step for step in steps if step.name in wanted]
    if args.wheels and not args.dry_run:
        missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            wheels = [WHEEL_NAMES.get(name, name) for name in missing]
            command = ["-m", "pip", "install", "--no-index", "--find-links", args.wheels, *wheels]
            steps.insert(0, Step("wheels", _python(*command), 60))

    results = []
    for step in steps:
        if args.dry_run:
            results.append(StepResult(step.name, step.command, step.cap_s, "planned"))
            continue
        seconds_left = args.time_budget - (time.perf_counter() - started)
        results.append(run_step(step, seconds_left, args.time_scale))
        print(
            f"{step.name:<16} {results[-1].status:<9} {results[-1].seconds:7.1f} s",
            file=sys.stderr,
            flush=True,
        )

    report = {
        "benchmark": "gpu acceptance run",
        "mode": "dry-run" if args.dry_run else ("cpu" if args.cpu else "cuda"),
        "time_budget_s": args.time_budget,
        "planned_caps_s": sum(step.cap_s for step in steps),
        "total_s": round(time.perf_counter() - started, 1),
        "steps": [asdict(result) for result in results],
    }
    Path(args.report).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "steps"} | {"report": args.report}))
    return 0 if all(result.status in ("passed", "planned") for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
