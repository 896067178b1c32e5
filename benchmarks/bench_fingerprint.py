"""What ShiftKV's check for a changed q_proj weight costs, against the prefill of the layer it serves.

A reused :class:`~mmshiftkv.presses.ShiftKVPress` keeps each layer's projected proxy noise ``W z``
and, at every prefill, recomputes the weight's fingerprint (its product with
a random vector, :func:`mmshiftkv.presses.shiftkv.weight_fingerprint`) to notice a changed weight. One
decoder layer with Qwen2.5-VL-7B's text dimensions (the model of ``bench_shiftkv_overhead.py``,
random weights, CPU) prefills T tokens; printed as JSON per dtype and length: the median prefill
without a press, the median fingerprint of the layer's q_proj (3584 x 3584), their ratio, and the
projection a changed weight costs instead (``W z`` and ``W 1`` recomputed: ``reprojection_s``).

    python benchmarks/bench_fingerprint.py --lengths 1024 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from bench_shiftkv_overhead import Clock, plain_prefill, qwen25vl_7b_layer

from mmshiftkv import ShiftKVPress
from mmshiftkv.presses.shiftkv import weight_fingerprint

FINGERPRINT_REPEATS = 20
CLOCK = Clock("cpu")


def median_seconds(function, repeats: int) -> float:
    return statistics.median(CLOCK.time(function) for _ in range(repeats))


def measure(model, length: int, dtype: torch.dtype, repeats: int) -> dict:
    embeds = torch.randn(1, length, 3584, generator=torch.Generator().manual_seed(length)).to(dtype)
    plain_prefill(model, embeds, CLOCK)  # warm-up: allocator, thread pool
    prefill_s = statistics.median(plain_prefill(model, embeds, CLOCK) for _ in range(repeats))
    projection = model.model.layers[0].self_attn.q_proj
    probe = torch.randn(projection.weight.shape[1]).to(dtype)
    with torch.no_grad():
        fingerprint_s = median_seconds(
            lambda: weight_fingerprint(projection.weight, probe), FINGERPRINT_REPEATS
        )

    def reproject() -> None:
        ShiftKVPress()._projected_noise(projection, 0)  # a fresh press: nothing kept, everything computed

    reprojection_s = median_seconds(reproject, repeats)
    return {
        "prompt_tokens": length,
        "repeats": repeats,
        "prefill_s": round(prefill_s, 4),
        "fingerprint_s": round(fingerprint_s, 6),
        "fingerprint_over_prefill": round(fingerprint_s / prefill_s, 7),
        "reprojection_s": round(reprojection_s, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = qwen25vl_7b_layer(dtype, "cpu")
        for length in (int(n) for n in args.lengths.split(",")):
            results.append({"dtype": dtype_name, **measure(model, length, dtype, args.repeats)})
        del model
    print(
        json.dumps(
            {
                "benchmark": "ShiftKV q_proj fingerprint vs one layer's prefill",
                "model": "1 Qwen2.5-VL-7B text layer, cpu, random weights, sdpa",
                "torch_threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
