"""Decode speed and memory of a head-wise vs a uniform compressed cache at the same total budget.

A few decoder layers with Qwen2.5-VL-7B's text dimensions (hidden 3584, 28 query heads, 4 KV heads,
head_dim 128, MLP 18944) and random weights; the prompt cache is random keys/values of the
given context length (no prefill is run), compressed with :class:`CompressedLayer` to

* ``uniform``: ``budget`` tokens for every KV head;
* ``headwise``: per layer and sample, the same total ``kv_heads * budget`` split AdaKV-like
  (every head gets ``alpha * budget``, the rest is shared by random Dirichlet weights);

plus ``full``, the uncompressed :class:`DynamicLayer` cache, for scale. Prints one JSON object:
decode ms/token of the whole model and of the attention alone (cache update + attention of one
layer), as median and min over repeats of ``steps`` tokens, the variants interleaved within each
repeat, with the paired head-wise / uniform ratio; and the bytes held vs the ideal sum of lengths.

Usage::

    python benchmarks/bench_headwise_decode.py --contexts 2048 8192 16384 --budget 512
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicLayer

from mmshiftkv.cache import CompressedLayer, cache_argument, compressed_attention, compressed_sdpa, crop_to
from mmshiftkv.presses.selection import select_kept_indices

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, MLP = 3584, 28, 4, 128, 18944


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--budget", type=int, default=512, help="tokens per KV head (uniform)")
    parser.add_argument("--alpha", type=float, default=0.2, help="share of the budget every head keeps")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="decode tokens per repeat")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if not 0.0 <= args.alpha <= 1.0:
        parser.error("--alpha must lie in [0, 1]")
    return args


def headwise_lengths(batch: int, budget: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``(batch, kv_heads)`` lengths summing to ``kv_heads * budget`` per sample."""
    floor = int(alpha * budget)
    shared = KV_HEADS * (budget - floor)
    # Dirichlet(1, ..., 1) weights: normalised Exp(1) draws.
    weights = -torch.rand(batch, KV_HEADS, generator=generator).log()
    extra = (weights / weights.sum(-1, keepdim=True) * shared).floor().long()
    extra[:, 0] += shared - extra.sum(-1)
    return floor + extra


def build_cache(
    context: int, budgets: list[torch.Tensor | None], batch: int, dtype: torch.dtype, device: str, seed: int
) -> DynamicCache:
    """Random prompt cache; per layer, ``(batch, kv_heads)`` budgets or None (keep it full)."""
    generator = torch.Generator(device).manual_seed(seed)
    cache = DynamicCache()
    for layer_budget in budgets:
        shape = (batch, KV_HEADS, context, HEAD_DIM)
        keys = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if layer_budget is None:
            layer = DynamicLayer()
            layer.update(keys, values)
        else:
            scores = torch.rand(shape[:3], generator=generator, device=device)
            indices, lengths = select_kept_indices(scores, layer_budget.to(device))
            layer = CompressedLayer.from_selection(keys, values, indices, lengths)
        cache.layers.append(layer)
    return cache


def paired_timings(
    runs: dict[str, tuple[Callable[[], object], Callable[[], None]]], steps: int, repeats: int, device: str
) -> dict[str, dict[str, float]]:
    """Interleaved timings: each repeat times every variant once (order rotated), in ms per call.

    Interleaving keeps the variants under the same machine load, so the paired ratio
    ``headwise / uniform`` (median over repeats) is robust to noise from other processes.
    ``runs`` maps a name to (one call, reset before a repeat). One warm-up repeat is dropped.
    """
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats + 1):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            run, reset = runs[name]
            reset()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat:
                times[name].append((time.perf_counter() - start) * 1000 / steps)
    summary = {name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()}
    ratios = [h / u for h, u in zip(times["headwise"], times["uniform"])]
    summary["headwise_over_uniform"] = {
        "median": statistics.median(ratios),
        "of_min": min(times["headwise"]) / min(times["uniform"]),
    }
    return summary


def cache_bytes(cache: DynamicCache) -> dict[str, int]:
    layers = cache.layers
    if not isinstance(layers[0], CompressedLayer):
        held = sum(
            layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
            for layer in layers
        )
        return {"held": held, "ideal": held}
    itemsize = torch.empty((), dtype=layers[0].dtype).element_size()
    padded = sum(int(layer.prompt_lengths.max()) * layer.prompt_lengths.numel() for layer in layers)
    return {
        "held": sum(layer.nbytes for layer in layers),
        "ideal": sum(layer.ideal_nbytes for layer in layers),
        "padded_to_largest_head": padded * 2 * HEAD_DIM * itemsize,
    }


def measure(
    model: Qwen2ForCausalLM, context: int, args: argparse.Namespace, generator: torch.Generator
) -> dict:
    """Timings and bytes of the full, uniform and head-wise caches at one context length."""
    dtype, device = getattr(torch, args.dtype), args.device
    uniform = [torch.full((args.batch, KV_HEADS), args.budget) for _ in range(args.layers)]
    headwise = [headwise_lengths(args.batch, args.budget, args.alpha, generator) for _ in range(args.layers)]
    caches = {
        "full": build_cache(context, [None] * args.layers, args.batch, dtype, device, args.seed),
        "uniform": build_cache(context, uniform, args.batch, dtype, device, args.seed),
        "headwise": build_cache(context, headwise, args.batch, dtype, device, args.seed),
    }
    token = torch.zeros(args.batch, 1, dtype=torch.long, device=device)
    query = torch.randn(args.batch, Q_HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
    new = torch.randn(args.batch, KV_HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
    scaling = model.model.layers[0].self_attn.scaling
    entry: dict = {"context": context, "bytes": {name: cache_bytes(cache) for name, cache in caches.items()}}
    with torch.inference_mode(), compressed_attention(model):
        entry["ms_per_token"] = paired_timings(
            {
                name: (
                    functools.partial(model, input_ids=token, **cache_argument(model, cache)),
                    functools.partial(crop_to, cache, context),
                )
                for name, cache in caches.items()
            },
            args.steps,
            args.repeats,
            device,
        )
        entry["attention_ms_per_layer"] = paired_timings(
            {
                name: (
                    functools.partial(attention_step, caches[name].layers[0], query, new, scaling),
                    functools.partial(crop_to, caches[name].layers[0], context),
                )
                for name in ("uniform", "headwise")
            },
            args.steps,
            args.repeats,
            device,
        )
    entry["headwise_buckets_per_layer"] = [len(layer.buckets) for layer in caches["headwise"].layers]
    entry["headwise_lengths_layer0"] = caches["headwise"].layers[0].prompt_lengths.tolist()
    return entry


def attention_step(layer: CompressedLayer, query: torch.Tensor, new: torch.Tensor, scaling: float) -> None:
    """One decode step of one layer's attention: append the new token, attend."""
    layer.update(new, new)
    compressed_sdpa(layer, query, None, scaling)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), args.device
    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=args.layers,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=max(args.contexts) + 1024,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    results = [measure(model, context, args, generator) for context in args.contexts]
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                "torch_threads": torch.get_num_threads(),
                "dtype": args.dtype,
                "model": {
                    "layers": args.layers,
                    "hidden": HIDDEN,
                    "q_heads": Q_HEADS,
                    "kv_heads": KV_HEADS,
                    "head_dim": HEAD_DIM,
                    "intermediate": MLP,
                },
                "batch": args.batch,
                "budget_per_head": args.budget,
                "alpha": args.alpha,
                "steps": args.steps,
                "repeats": args.repeats,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
