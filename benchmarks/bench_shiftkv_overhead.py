"""ShiftKV's and SnapKV's scoring time against the prefill forward they ride on and the logits GEMMs.

One decoder layer with Qwen2.5-VL-7B's text dimensions (hidden 3584, 28 query heads, 4 KV heads,
head_dim 128, MLP 18944; random weights) prefills T tokens; ShiftKVPress (N=512 proxies, G=32
groups) and SnapKVPress (window 32, kernel 5) each compress to 64 tokens per KV head. Each press is
made once and serves every call, as a press serving requests does. Inside each press's prefill its
``score`` (everything the press adds: statistics, projections, RoPE, the op) runs ``repeats + 1``
times on the layer's real inputs: the first call (for ShiftKV it also projects the layer's fixed
proxy noise, kept on the press) is reported apart as ``first_scoring_s``, the others give the
median ``scoring_s``. Interleaved with ShiftKV's calls, in the same repeat:

* ``logits_floor_s``: the bare GEMMs of ShiftKV's proxy logits (N x 28 heads x T x 128, the work no
  exact method can skip) through ATen (MKL / oneDNN / cuBLAS), in 256-row blocks into one reused
  buffer, in the dtype of the op's logits GEMM (``logits_gemm_dtype``: bfloat16 where the op uses
  its bfloat16 GEMM, float32 otherwise), output in that dtype;
* ``op_gemm_s`` (CPU): the op's own logits GEMM alone, same shapes (``ops.compiled.logit_max``).

Ratios: ``scoring_over_floor`` (ShiftKV / ``logits_floor_s``), ``scoring_over_op_gemm``, and
``scoring_over_fastest_gemm`` against the faster of the two GEMMs; ``op_s`` is the part of
``scoring_s`` spent in the op (``ops.shiftkv_scores``), ``op_over_floor`` its ratio. The report
names the ATen CPU capability and the op's CPU kernel for each dtype. The op's votes in ShiftKV's
last call are checked against the float64 reference on the same inputs (``votes_differing``, and
``votes_differing_beyond_margin``, which must be 0: the script exits with status 1 otherwise).
The paper's released code adds +23% to prefill at 32K.

    python benchmarks/bench_shiftkv_overhead.py --lengths 1024,4096,16384 --dtypes float32,bfloat16

``--floor-only`` keeps ShiftKV's prefill alone (no SnapKV, no plain prefill: a third of the time) and
reports the figures against the floor; ``--threads 1 --cpu-time`` times one thread's CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from mmshiftkv import ShiftKVPress, SnapKVPress, ops
from mmshiftkv.cache import cache_argument
from mmshiftkv.ops import compiled, precision

BUDGET = 64
FLOOR_BLOCK_ROWS = 256
KV_HEADS, HEADS_PER_KV, HEAD_DIM = 4, 7, 128
WARMUP_TOKENS = 128
MASS_OPTIONS = ("n_groups", "scaling", "key_mask", "anchor_in_groups", "exclude_last_key")


def qwen25vl_7b_layer(dtype: torch.dtype, device: str) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=1,
        num_attention_heads=KV_HEADS * HEADS_PER_KV,
        num_key_value_heads=KV_HEADS,
        vocab_size=128,
        max_position_embeddings=65536,
        rope_theta=1e6,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class Clock:
    """Times calls on ``device``: wall time, or (``cpu_time``) the process's CPU time, which with one
    thread is immune to other jobs taking turns on the cores (with more it adds up every thread's)."""

    device: str
    cpu_time: bool = False

    def time(self, function: Callable[[], object]) -> float:
        """Seconds of one call, the device's queued work included."""
        now = time.process_time if self.cpu_time else time.perf_counter
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = now()
        function()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return now() - start


def gemm_dtype(dtype: torch.dtype, device: str) -> torch.dtype:
    """The dtype the op's logits GEMM works in for inputs of ``dtype``."""
    if device == "cuda":  # bfloat16/float16 on tensor cores, float32 in float32
        return dtype
    return torch.bfloat16 if compiled.cpu_kernel(dtype).endswith("_bf16") else torch.float32


class LogitsGemms:
    """The bare logits GEMMs of one layer's N proxies (7 query heads per KV head) at T keys."""

    def __init__(self, length: int, n_proxies: int, dtype: torch.dtype, clock: Clock) -> None:
        generator = torch.Generator().manual_seed(0)
        rows = torch.randn(KV_HEADS, HEADS_PER_KV * n_proxies, HEAD_DIM, generator=generator)
        keys = torch.randn(KV_HEADS, length, HEAD_DIM, generator=generator)
        self.rows, self.keys = rows.to(clock.device, dtype), keys.to(clock.device, dtype)
        self.logits = torch.empty(FLOOR_BLOCK_ROWS, length, device=clock.device, dtype=dtype)
        self.clock = clock

    def aten(self) -> float:
        """In blocks of FLOOR_BLOCK_ROWS rows into one reused buffer (one unblocked GEMM would mostly
        time writing a 7 N x T output to memory)."""

        def run() -> None:
            for head_rows, head_keys in zip(self.rows, self.keys):
                for block in head_rows.split(FLOOR_BLOCK_ROWS):
                    torch.mm(block, head_keys.t(), out=self.logits[: block.shape[0]])

        return self.clock.time(run)

    def op(self) -> float:
        """The op's own GEMM stage (CPU), same rows and keys."""

        def run() -> None:
            for head_rows, head_keys in zip(self.rows, self.keys):
                compiled.logit_max(head_rows, head_keys, HEAD_DIM**-0.5)

        return self.clock.time(run)


class OpTimer:
    """Adds up the seconds spent in ``ops.shiftkv_scores`` (which ShiftKVPress calls) while active,
    and keeps the last timed call's inputs and scores for :func:`vote_agreement`."""

    def __init__(self, clock: Clock) -> None:
        self.seconds, self.active, self.last_call = 0.0, False, None
        op = ops.shiftkv_scores

        def timed_op(*args, **kwargs):
            if not self.active:
                return op(*args, **kwargs)
            result = None

            def call() -> None:
                nonlocal result
                result = op(*args, **kwargs)

            self.seconds += clock.time(call)
            self.last_call = (args, kwargs, result)
            return result

        ops.shiftkv_scores = timed_op


class ScoringTimer:
    """Wraps a press's ``score``: in the press's prefill, times its first call and ``repeats``
    more on the same inputs, each followed by the ``between`` measurements."""

    def __init__(
        self, press, repeats: int, clock: Clock, between: dict[str, Callable[[], float]], op_timer: OpTimer
    ) -> None:
        self.press, self.first_s, self.seconds, self.op_seconds = press, 0.0, [], []
        self.between: dict[str, list[float]] = {name: [] for name in between}
        score = press.score

        def timed_score(*args, **kwargs):
            result = None

            def call() -> None:
                nonlocal result
                result = score(*args, **kwargs)

            self.first_s = clock.time(call)
            for _ in range(repeats):
                op_timer.seconds, op_timer.active = 0.0, True
                self.seconds.append(clock.time(call))
                op_timer.active = False
                self.op_seconds.append(op_timer.seconds)
                for name, measure in between.items():
                    self.between[name].append(measure())
            return result

        press.score = timed_score

    def prefill(self, model, embeds: torch.Tensor) -> None:
        with torch.no_grad(), self.press(model):
            model.model(inputs_embeds=embeds, **cache_argument(model.model, DynamicCache()))


def vote_agreement(args: tuple, options: dict, scores: torch.Tensor) -> dict:
    """The op's votes in the press's last call against the float64 reference's, on the same inputs.

    ``votes_differing`` counts the (KV head, token) pairs whose vote count differs;
    ``votes_differing_beyond_margin`` those where it differs by more than the groups the stated
    margin (``ops.precision.mass_margin``) leaves uncertain (``ops.precision.uncertain_votes``).
    """
    mass, anchor = ops.group_attention_mass(*args, **{name: options[name] for name in MASS_OPTIONS})
    mass, anchor = mass.cpu(), anchor.cpu()  # the reference's float64 runs where the op ran
    votes = ops.votes_from_mass(mass, options["tau"], options["coverage"]).sum(dim=2).double()
    op_votes = torch.round(scores.cpu().double() - options["anchor_weight"] * anchor)
    margin = precision.mass_margin(*args, n_groups=options["n_groups"], scaling=options["scaling"])
    allowed = precision.uncertain_votes(mass, options["tau"], options["coverage"], margin)
    real = torch.ones_like(votes, dtype=torch.bool)
    if options["key_mask"] is not None:
        real = options["key_mask"].cpu().bool()[:, None, :].expand_as(votes)
    difference = (op_votes - votes).abs().masked_fill(~real, 0.0)
    return {
        "votes_compared": int(real.sum()),
        "votes_differing": int((difference > 0).sum()),
        "votes_differing_beyond_margin": int((difference > allowed).sum()),
    }


def plain_prefill(model, embeds: torch.Tensor, clock: Clock) -> float:
    def run() -> None:
        with torch.no_grad():
            model.model(inputs_embeds=embeds, **cache_argument(model.model, DynamicCache()))

    return clock.time(run)


def measure(
    model, length: int, dtype: torch.dtype, repeats: int, clock: Clock, op_timer: OpTimer, floor_only: bool
) -> dict:
    generator = torch.Generator().manual_seed(length)
    embeds = torch.randn(1, length, 3584, generator=generator).to(clock.device, dtype)
    plain_prefill(model, embeds[:, :WARMUP_TOKENS], clock)  # warm-up: allocator, thread pool
    shiftkv = ShiftKVPress(budget=BUDGET)
    gemms = LogitsGemms(length, shiftkv.n_proxies, gemm_dtype(dtype, clock.device), clock)
    between = {"floor": gemms.aten} | ({"op_gemm": gemms.op} if clock.device == "cpu" else {})
    for measure_gemms in between.values():  # warm-up: the BLAS's first call
        measure_gemms()
    timers = {"shiftkv": ScoringTimer(shiftkv, repeats, clock, between, op_timer)}
    if not floor_only:
        timers["snapkv"] = ScoringTimer(SnapKVPress(budget=BUDGET), repeats, clock, {}, op_timer)
    for timer in timers.values():
        timer.prefill(model, embeds)

    entry = {"prompt_tokens": length, "repeats": repeats}
    entry["first_scoring_s"] = round(timers["shiftkv"].first_s, 4)
    # ShiftKV is the subject: its figures keep the plain names, SnapKV's are prefixed.
    seconds = {name: statistics.median(timer.seconds) for name, timer in timers.items()}
    for name, value in seconds.items():
        entry[f"{'' if name == 'shiftkv' else f'{name}_'}scoring_s"] = round(value, 4)
    gemm_seconds = {name: statistics.median(values) for name, values in timers["shiftkv"].between.items()}
    entry["logits_gemm_dtype"] = str(gemms.rows.dtype).removeprefix("torch.")
    entry["logits_floor_s"] = round(gemm_seconds["floor"], 4)
    entry["scoring_over_floor"] = round(seconds["shiftkv"] / gemm_seconds["floor"], 3)
    if "op_gemm" in gemm_seconds:
        entry["op_gemm_s"] = round(gemm_seconds["op_gemm"], 4)
        entry["scoring_over_op_gemm"] = round(seconds["shiftkv"] / gemm_seconds["op_gemm"], 3)
    entry["scoring_over_fastest_gemm"] = round(seconds["shiftkv"] / min(gemm_seconds.values()), 3)
    op_seconds = statistics.median(timers["shiftkv"].op_seconds)
    entry["op_s"] = round(op_seconds, 4)
    entry["op_over_floor"] = round(op_seconds / gemm_seconds["floor"], 3)
    if not floor_only:
        prefill_s = plain_prefill(model, embeds, clock)
        entry["prefill_s"] = round(prefill_s, 4)
        entry["scoring_over_prefill"] = round(seconds["shiftkv"] / prefill_s, 5)
        entry["snapkv_scoring_over_prefill"] = round(seconds["snapkv"] / prefill_s, 5)
        entry["shiftkv_over_snapkv"] = round(seconds["shiftkv"] / seconds["snapkv"], 3)
        entry["logits_floor_over_prefill"] = round(gemm_seconds["floor"] / prefill_s, 5)
    args, options, scores = op_timer.last_call
    return entry | vote_agreement(args, options, scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5, help="scoring calls per press after the first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time CPU seconds (with --threads 1)")
    parser.add_argument(
        "--floor-only",
        action="store_true",
        help="ShiftKV against the logits floor only: no SnapKV, no plain prefill",
    )
    args = parser.parse_args()
    if args.cpu_time and (args.threads != 1 or args.device != "cpu"):
        raise SystemExit("--cpu-time measures one CPU thread: use it with --threads 1 --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = Clock(args.device, args.cpu_time)
    if args.device == "cuda" and not ops.available()["cuda"]:
        raise SystemExit("the compiled op has no CUDA kernel here: build it with a CUDA toolkit on a GPU")

    dtypes = args.dtypes.split(",")
    op_timer = OpTimer(clock)
    results = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model = qwen25vl_7b_layer(dtype, args.device)
        for length in (int(n) for n in args.lengths.split(",")):
            entry = measure(model, length, dtype, args.repeats, clock, op_timer, args.floor_only)
            results.append({"dtype": dtype_name, **entry})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        del model
    report = {
        "benchmark": "scoring overhead: ShiftKV vs SnapKV and the logits GEMMs, share of one prefill",
        "model": f"1 Qwen2.5-VL-7B text layer, {args.device}, random weights, sdpa",
        "budget": BUDGET,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "clock": "process CPU time" if args.cpu_time else "wall",
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "op_cpu_kernel": {name: compiled.cpu_kernel(getattr(torch, name)) for name in dtypes},
        "backend": ops.available(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if any(entry["votes_differing_beyond_margin"] for entry in results):
        raise SystemExit("the op's votes differ from the reference's beyond the stated margin")


if __name__ == "__main__":
    main()
