"""Import time of the library next to the libraries it needs, measured side by side (JSON).

    python benchmarks/bench_import.py --repeats 5

Each statement runs in a fresh interpreter, interleaved with the others in every repeat so that
machine load affects all alike; medians and ratios to ``import torch, transformers`` are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "python": "pass",
    "torch_transformers": "import torch, transformers",
    "mmshiftkv": "import mmshiftkv",
    "from_mmshiftkv_import_press": "from mmshiftkv import ShiftKVPress",
    "mmshiftkv_cli_help": "import sys; sys.argv = ['mmshiftkv', '--help']; from mmshiftkv.cli import "
    "main; main()",
}


def run_once(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=False, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for _ in range(args.repeats):
        for name, statement in STATEMENTS.items():
            times[name].append(run_once(statement))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["torch_transformers"]
    ratios = {name: round(value / base, 3) for name, value in medians.items()}
    print(
        json.dumps(
            {
                "repeats": args.repeats,
                "median_s": {name: round(value, 3) for name, value in medians.items()},
                "ratio_to_torch_transformers": ratios,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
