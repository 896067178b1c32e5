"""Decode speed and peak memory vs input length (paper Fig. 3), ``mmshiftkv profile``.

For each input length (the paper: 2K, 4K, 8K, 16K, 32K) and each press (FullKV and the presses at
one budget, the paper: 256), a synthetic prompt of random token embeddings is prefilled under the
press, then ``decode_tokens`` tokens (the paper: 100) are generated greedily. Reported per point:

* ``decode_ms_per_token``: the median over decode steps of the wall time between the ends of two
  consecutive forward passes inside ``generate`` (one decode step, ``generate``'s own work
  included; CUDA is synchronised at each step);
* ``prefill_s``: the prefill forward (scoring and compression included);
* ``peak_memory_bytes`` / ``peak_memory_delta_bytes``: the peak during prefill + decoding, and its
  excess over the memory held just before. On CUDA: ``torch.cuda.max_memory_allocated`` (tensors
  only, weights included, as the paper's "peak GPU memory"). On CPU: the process's peak resident
  set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each point, after
  returning freed heap memory to the OS with ``malloc_trim``), so it also counts allocator
  overhead and everything else the process holds; the delta is the meaningful part there.
* ``kv_cache_bytes``: bytes the KV cache holds at the end (compressed prompt + generated tokens).

Model: a real checkpoint (``--model``, typically on a GPU) or, by default, a
``Qwen2ForCausalLM`` with a few decoder layers of Qwen2.5-VL-7B's text dimensions and random
weights (:func:`build_profile_model`), which runs on a CPU. Its vocabulary is shrunk (the
output layer is not what compression changes) and it uses 1-D RoPE instead of M-RoPE (same cost).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM
from transformers.initialization import no_init_weights

from mmshiftkv.cache.compat import prompt_cache_argument, returned_cache
from mmshiftkv.evaluation import report
from mmshiftkv.generation import load_model
from mmshiftkv.presses import BudgetedPress
from mmshiftkv.registry import FULL, PRESSES, make_press, press_name

__all__ = [
    "QWEN25_VL_7B_TEXT",
    "PeakMemory",
    "ProfilePoint",
    "build_profile_model",
    "kv_cache_bytes",
    "main",
    "profile_point",
    "run_profile",
]

#: Decoder dimensions of Qwen2.5-VL-7B-Instruct's language model (its config.json).
QWEN25_VL_7B_TEXT: dict[str, Any] = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)


_TILE = 1 << 20


def build_profile_model(
    num_layers: int = 2,
    vocab_size: int = 1024,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> PreTrainedModel:
    """A random-weight ``Qwen2ForCausalLM`` with ``num_layers`` Qwen2.5-VL-7B decoder layers.

    3584 hidden, 28 query heads and 4 KV heads of dimension 128, MLP 18944: about 233M parameters
    per layer (0.47 GB in bf16). Weight matrices are filled with tiles of one seeded block of
    N(0, 0.02^2) values (drawing 233M normal values per layer takes seconds on a CPU; speed and
    memory do not depend on the values), biases with zeros, norms with ones.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    config = Qwen2Config(num_hidden_layers=num_layers, vocab_size=vocab_size, **QWEN25_VL_7B_TEXT)
    config._attn_implementation = attn_implementation
    with no_init_weights(), torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    block = (torch.randn(_TILE, generator=generator) * config.initializer_range).to(device, dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.view(-1)
            if name.endswith("bias"):
                flat.zero_()
            elif param.ndim > 1:
                for start in range(0, flat.numel(), _TILE):
                    piece = flat[start : start + _TILE]
                    piece.copy_(block[: piece.numel()])
    return model.requires_grad_(False).eval()


class PeakMemory:
    """Peak memory of one measured section on ``device`` (see the module docstring).

    ``start()`` resets the peak; ``peak()`` and ``baseline`` are then in bytes (None where the
    platform offers no peak counter).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.baseline: int | None = None
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif self._can_reset_rss():
            self.method = "process peak RSS (VmHWM, reset via /proc/self/clear_refs)"
        else:
            self.method = "unavailable (needs CUDA, or Linux /proc/self/clear_refs)"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_bytes(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} missing from /proc/self/status")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("process"):
            libc = ctypes.util.find_library("c")
            if libc is not None:
                ctypes.CDLL(libc).malloc_trim(0)  # freed heap back to the OS: a lower, honest baseline
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # VmHWM := current RSS
            self.baseline = self._status_bytes("VmRSS")

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.method.startswith("process"):
            return self._status_bytes("VmHWM")
        return None


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of keys and values a cache holds (compressed layers: their real storage)."""
    total = 0
    for layer in cache.layers:
        held = getattr(layer, "nbytes", None)
        total += held if isinstance(held, int) else layer.keys.nbytes + layer.values.nbytes
    return total


@dataclass
class ProfilePoint:
    """One (press, input length) measurement; see the module docstring for each field."""

    method: str
    press: str
    budget: int | None
    input_length: int
    decode_tokens: int
    prefill_s: float
    decode_ms_per_token: float
    decode_ms_per_token_mean: float
    peak_memory_bytes: int | None
    peak_memory_delta_bytes: int | None
    memory_method: str
    kv_cache_bytes: int


def profile_point(
    model: PreTrainedModel,
    press: BudgetedPress,
    input_length: int,
    decode_tokens: int = 100,
    seed: int = 0,
) -> ProfilePoint:
    """Prefill a random prompt of ``input_length`` tokens under ``press``, decode, measure."""
    if decode_tokens < 2:
        raise ValueError(f"decode_tokens must be >= 2 (one prefill + decode steps), got {decode_tokens}")
    device = model.device
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, input_length), generator=generator).to(device)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    attention_mask = torch.ones_like(ids)
    stamps: list[float] = []

    def stamp(*_: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    memory = PeakMemory(device)
    hook = model.register_forward_hook(stamp)
    try:
        memory.start()
        start = time.perf_counter()
        with press(model), torch.no_grad():
            output = model.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                **prompt_cache_argument(model),
                max_new_tokens=decode_tokens,
                min_new_tokens=decode_tokens,
                do_sample=False,
                return_dict_in_generate=True,
            )
        peak = memory.peak()
    finally:
        hook.remove()
    steps = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
    return ProfilePoint(
        method=report.method_label(press_name(press)),
        press=press_name(press),
        budget=press.budget,
        input_length=input_length,
        decode_tokens=decode_tokens,
        prefill_s=stamps[0] - start,
        decode_ms_per_token=statistics.median(steps),
        decode_ms_per_token_mean=statistics.fmean(steps),
        peak_memory_bytes=peak,
        peak_memory_delta_bytes=None if peak is None else peak - memory.baseline,
        memory_method=memory.method,
        kv_cache_bytes=kv_cache_bytes(returned_cache(output)),
    )


def run_profile(
    model: PreTrainedModel,
    presses: Sequence[str],
    lengths: Sequence[int],
    budget: int = 256,
    decode_tokens: int = 100,
    seed: int = 0,
    on_point: Callable[[ProfilePoint], None] | None = None,
) -> list[ProfilePoint]:
    """FullKV and every press of ``presses`` at ``budget``, for each input length.

    A short warm-up generation runs first so one-off initialisation is not timed.
    """
    names = [FULL, *[p for p in presses if p != FULL]]
    unknown = [p for p in names if p not in PRESSES]
    if unknown:
        raise ValueError(f"unknown press(es) {unknown}; choose from {', '.join(PRESSES)}")
    profile_point(model, make_press(FULL), min(64, min(lengths)), 2, seed)
    points = []
    for length in lengths:
        for name in names:
            press = make_press(name, budget=budget)
            point = profile_point(model, press, length, decode_tokens, seed)
            points.append(point)
            if on_point is not None:
                on_point(point)
    return points


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``mmshiftkv profile``: writes ``profile.json`` and ``fig3_profile.png``."""
    parser = argparse.ArgumentParser(
        prog="mmshiftkv profile",
        description="Fig. 3: decode ms/token and peak memory vs input length, FullKV vs presses.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="hub id or local path (AutoModelForImageTextToText); default: random-weight layers "
        "of Qwen2.5-VL-7B's dimensions (--layers)",
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the default model")
    parser.add_argument("--lengths", type=_ints, default="2048,4096,8192,16384,32768")
    parser.add_argument(
        "--presses",
        default="shiftkv,snapkv,streaming_llm,keydiff,expected_attention",
        help="FullKV is always run",
    )
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=100)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="mmshiftkv-profile")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_plot:
        report.require_matplotlib()
    dtype = getattr(torch, args.dtype)
    if args.model is None:
        model = build_profile_model(
            args.layers, dtype=dtype, attn_implementation=args.attn_implementation, device=args.device
        )
        model_name = f"random Qwen2.5-VL-7B text dims, {args.layers} layer(s)"
    else:
        model, _ = load_model(args.model, args.dtype, None, args.attn_implementation, args.device)
        model_name = args.model
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]

    def show(point: ProfilePoint) -> None:
        memory = "n/a" if point.peak_memory_bytes is None else f"{point.peak_memory_bytes / 2**30:.2f} GiB"
        delta = (
            ""
            if point.peak_memory_delta_bytes is None
            else f" (+{point.peak_memory_delta_bytes / 2**30:.2f})"
        )
        print(
            f"{point.input_length:>6} {point.method:<14} prefill {point.prefill_s:7.2f} s  "
            f"decode {point.decode_ms_per_token:8.2f} ms/token  peak {memory}{delta}  "
            f"KV {point.kv_cache_bytes / 2**20:8.1f} MiB",
            flush=True,
        )

    points = run_profile(model, presses, args.lengths, args.budget, args.decode_tokens, args.seed, show)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model_name,
        "device": str(model.device),
        "dtype": args.dtype,
        "budget": args.budget,
        "decode_tokens": args.decode_tokens,
        "points": [asdict(p) for p in points],
    }
    (output_dir / "profile.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    if not args.no_plot:
        report.plot_profile(payload["points"], output_dir / "fig3_profile.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
