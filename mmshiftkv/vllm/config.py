"""Which press an engine runs, read from vLLM's ``additional_config``, and the engine settings it needs.

A press is enabled per engine, never process-wide::

    LLM(model, additional_config={"mmshiftkv": {"press": "shiftkv", "budget": 64}}, ...)
    vllm serve MODEL --additional-config '{"mmshiftkv": {"press": "snapkv", "budget": 128}}'

The configuration travels inside ``VllmConfig`` to the scheduler and to every worker process, so
all of them build the same press.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from mmshiftkv.presses import BudgetedPress
from mmshiftkv.registry import make_press

#: Key of this plugin's section in vLLM's ``additional_config``.
CONFIG_KEY = "mmshiftkv"

#: Presses whose scoring uses only what :class:`~mmshiftkv.vllm.adapter.VLLMAdapter` offers (queries,
#: RoPE and its cos/sin at any position, future positions); FullKV compresses nothing.
VLLM_PRESSES = ("shiftkv", "snapkv", "streaming_llm", "keydiff", "last_attn", "expected_attention")

#: Registered presses the plugin does not serve, and why (a user asking for one is told the reason).
UNSERVED_PRESSES = {
    "full": "FullKV compresses nothing: run the engine without the mmshiftkv section",
    "lookm": "LOOK-M merges evicted KV into kept KV, and the plugin writes kept blocks without merging",
    "mixkv": "MixKV reads a redundancy table by KV layer ordinal, which the vLLM adapter does not number",
    "vlcache": (
        "VL-Cache needs the prompt's image-token positions and per-prompt layer budgets, and the plugin "
        "serves uniform budgets over token ids it does not map to images"
    ),
}


#: Keys of the ``"mmshiftkv"`` section: the fields of :class:`VLLMPressConfig`.
SECTION_KEYS = ("press", "budget", "press_kwargs", "record_selection", "record_blocks", "record_limit")


class EngineConfigError(ValueError):
    """The vLLM engine's settings cannot run a press correctly (the message says what to change)."""


@dataclass
class VLLMPressConfig:
    """The press one vLLM engine applies at the end of every prompt's prefill.

    Parameters
    ----------
    press : str
        Name of the press, one of :data:`VLLM_PRESSES`.
    budget : int
        Prompt tokens every KV head keeps, the last prompt token included (uniform budgets:
        every layer and head keeps the same number). Prompts not longer than it stay whole.
    press_kwargs : dict, optional
        Further keyword arguments of the press class (``{"gamma": 10, "tau": 0.95}``).
    record_selection : bool, default=False
        Keep on each worker the kept token indices of the last ``record_limit`` compacted requests
        (``layers * kv_heads * budget`` integers per request; for tests and analysis).
    record_blocks : bool, default=False
        Keep on the scheduler the blocks each of the last ``record_limit`` requests held after
        every step it ran in, and the pool's usage after each of the last ``record_limit`` steps
        (:class:`~mmshiftkv.vllm.scheduler.BlockLedger`; for tests and analysis).
    record_limit : int, default=1024
        Requests (and steps) whose records are kept: the records' memory stays bounded however
        long the engine runs.
    """

    press: str
    budget: int
    press_kwargs: dict[str, Any] = field(default_factory=dict)
    record_selection: bool = False
    record_blocks: bool = False
    record_limit: int = 1024

    def __post_init__(self) -> None:
        if self.press in UNSERVED_PRESSES:
            raise EngineConfigError(
                f"mmshiftkv.vllm: press {self.press!r} is not served by the vLLM plugin: "
                f"{UNSERVED_PRESSES[self.press]}; choose from {', '.join(VLLM_PRESSES)}"
            )
        if self.press not in VLLM_PRESSES:
            raise EngineConfigError(
                f"mmshiftkv.vllm: unknown or unsupported press {self.press!r}; "
                f"choose from {', '.join(VLLM_PRESSES)}"
            )
        if isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Integral) or self.budget < 1:
            raise EngineConfigError(
                f"mmshiftkv.vllm: budget must be an int >= 1 (tokens per KV head), got {self.budget!r}"
            )
        if not isinstance(self.press_kwargs, dict):
            raise EngineConfigError(
                f"mmshiftkv.vllm: press_kwargs must be a dict, got {type(self.press_kwargs).__name__}"
            )
        refused = sorted({"budget", "compression_ratio", "allocator"} & set(self.press_kwargs))
        if refused:
            raise EngineConfigError(
                f"mmshiftkv.vllm: press_kwargs may not set {', '.join(refused)}: "
                "the vLLM plugin serves uniform absolute budgets only (give `budget`)"
            )
        for name in ("record_selection", "record_blocks"):
            if not isinstance(getattr(self, name), bool):
                raise EngineConfigError(f"mmshiftkv.vllm: {name} must be a bool, got {getattr(self, name)!r}")
        limit = self.record_limit
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
            raise EngineConfigError(f"mmshiftkv.vllm: record_limit must be an int >= 1, got {limit!r}")
        # Bad press arguments fail when the engine is configured, not at the first prompt.
        reason = self.build_press().chunked_prefill_reason()
        if reason is not None:
            # vLLM may split a prompt over steps even with chunked prefill off (at an image, when the
            # encoder budget is spent), so a press that cannot score chunks is never served.
            raise EngineConfigError(
                f"mmshiftkv.vllm: press {self.press!r} cannot score a prompt prefilled in chunks: {reason}"
            )

    def build_press(self) -> BudgetedPress:
        """A fresh press object with this configuration."""
        try:
            return make_press(self.press, budget=self.budget, **self.press_kwargs)
        except (TypeError, ValueError) as error:
            raise EngineConfigError(f"mmshiftkv.vllm: cannot build {self.press!r} press: {error}") from error

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> VLLMPressConfig | None:
        """The press configured for this engine, or None when the engine runs without one."""
        additional = getattr(vllm_config, "additional_config", None) or {}
        if not isinstance(additional, dict) or CONFIG_KEY not in additional:
            return None
        section = additional[CONFIG_KEY]
        if not isinstance(section, dict):
            raise EngineConfigError(
                f"mmshiftkv.vllm: additional_config[{CONFIG_KEY!r}] must be a dict, "
                f"such as {{'press': 'shiftkv', 'budget': 64}}; got {section!r}"
            )
        unknown = sorted(set(section) - set(SECTION_KEYS))
        if unknown:
            raise EngineConfigError(
                f"mmshiftkv.vllm: unknown keys {', '.join(unknown)} in additional_config[{CONFIG_KEY!r}] "
                f"(expected {', '.join(SECTION_KEYS)})"
            )
        missing = [name for name in ("press", "budget") if name not in section]
        if missing:
            raise EngineConfigError(
                f"mmshiftkv.vllm: additional_config[{CONFIG_KEY!r}] needs {', '.join(missing)}"
            )
        return cls(**section)


def check_engine_config(vllm_config: Any) -> None:
    """Refuse engine settings under which a prefill-time press would give wrong output or leak blocks.

    Raises
    ------
    EngineConfigError
        Naming each such setting and the value to use instead.
    """
    from vllm import envs
    from vllm.config import CompilationMode, CUDAGraphMode

    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching is on: "
            "a compressed request's blocks no longer hold the tokens their hashes name, "
            "so sharing them would serve wrong keys (pass enable_prefix_caching=False)"
        )
    scheduler = vllm_config.scheduler_config
    if getattr(scheduler, "async_scheduling", False):
        problems.append(
            "async scheduling is on: "
            "the plugin frees a compacted request's blocks when its step's output arrives "
            "(pass async_scheduling=False)"
        )
    compilation = vllm_config.compilation_config
    if compilation.mode != CompilationMode.NONE:
        problems.append(
            "torch.compile is on: "
            "the press reads each layer's attention input from Python hooks, which compiled graphs skip "
            "(pass enforce_eager=True)"
        )
    if compilation.cudagraph_mode not in (None, CUDAGraphMode.NONE):
        problems.append(
            f"cudagraph_mode is {compilation.cudagraph_mode.name}: "
            "replayed CUDA graphs skip the press's Python hooks while the scheduler still frees the blocks "
            "(pass enforce_eager=True, or compilation_config={'cudagraph_mode': 'NONE'})"
        )
    if envs.VLLM_USE_BREAKABLE_CUDAGRAPH:
        problems.append(
            "VLLM_USE_BREAKABLE_CUDAGRAPH=1 captures CUDA graphs without torch.compile, "
            "and replayed graphs skip the press's Python hooks "
            "(unset it or set VLLM_USE_BREAKABLE_CUDAGRAPH=0)"
        )
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        problems.append(
            f"pipeline_parallel_size={parallel.pipeline_parallel_size} keeps several batches in flight, "
            "and the plugin frees a compacted request's blocks when its step's output arrives "
            "(pass pipeline_parallel_size=1)"
        )
    if parallel.decode_context_parallel_size > 1:
        problems.append(
            f"decode_context_parallel_size={parallel.decode_context_parallel_size}: "
            "a request's KV is spread over several ranks, so the scheduler's and the workers' block sizes "
            "differ (pass decode_context_parallel_size=1)"
        )
    kv_heads = vllm_config.model_config.get_total_num_kv_heads()
    if parallel.tensor_parallel_size > kv_heads:
        problems.append(
            f"tensor_parallel_size={parallel.tensor_parallel_size} exceeds the model's {kv_heads} KV heads: "
            "vLLM then copies each KV head to several ranks, "
            "and each copy would be scored with only its rank's share of the head's queries "
            f"(pass tensor_parallel_size <= {kv_heads})"
        )
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is on (its draft tokens would be scored as prompt)")
    if vllm_config.kv_transfer_config is not None:
        problems.append(
            "a KV connector is configured (transferred blocks would not match the compacted layout)"
        )
    if vllm_config.use_v2_model_runner:
        problems.append(
            "the V2 model runner is selected: "
            "the plugin patches the V1 runner (GPUModelRunner, CPUModelRunner); "
            "set the environment variable VLLM_USE_V2_MODEL_RUNNER=0"
        )
    if problems:
        raise EngineConfigError(
            "mmshiftkv.vllm cannot run a press with these engine settings:\n- " + "\n- ".join(problems)
        )
