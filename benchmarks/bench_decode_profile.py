"""Decode ms/token, peak memory and KV bytes vs input length, FullKV vs presses (paper Fig. 3).

A thin wrapper over ``mmshiftkv profile`` (:mod:`mmshiftkv.evaluation.profiling`) that prints
the measured points as JSON lines. Defaults fit a CPU: two decoder layers of Qwen2.5-VL-7B's text
dimensions with random weights, bf16, budget 256 per KV head, 2K and 8K inputs, 32 decode tokens.

    python benchmarks/bench_decode_profile.py
    python benchmarks/bench_decode_profile.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --lengths 2048,4096,8192,16384,32768 --decode-tokens 100   # on a GPU: the paper's setting
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from mmshiftkv.evaluation import profiling

DEFAULTS = ["--layers", "2", "--lengths", "2048,8192", "--presses", "shiftkv,snapkv", "--budget", "256"]
DEFAULTS += ["--decode-tokens", "32", "--no-plot"]

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        status = profiling.main([*DEFAULTS, *sys.argv[1:], "--output-dir", tmp])
        for point in json.loads((Path(tmp) / "profile.json").read_text())["points"]:
            print(json.dumps(point))
    sys.exit(status)
