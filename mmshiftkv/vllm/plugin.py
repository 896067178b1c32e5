"""The vLLM general plugin: ``register()`` runs in every vLLM process (entry points ``vllm.general_plugins``).

It changes nothing for engines that do not name a press. For an engine whose
``additional_config`` has a ``"mmshiftkv"`` section (see :mod:`mmshiftkv.vllm.config`) it

* checks the engine settings when the engine config is created (front end) and again in the
  scheduler and each worker (they may run in other processes);
* gives the scheduler a :class:`~mmshiftkv.vllm.scheduler.BlockLedger` and each model runner a
  :class:`~mmshiftkv.vllm.worker.Compactor`;
* carries the requests whose compaction failed from the workers to the scheduler, as an attribute
  of the step's ``ModelRunnerOutput`` (pickled with it across processes), and finishes them there.

vLLM has no public API for shortening a request's KV, so the plugin wraps a few internal methods
(``Scheduler.__init__`` / ``_update_after_schedule`` / ``update_from_output``,
``GPUModelRunner.initialize_kv_cache`` / ``_update_states`` / ``_prepare_inputs`` /
``execute_model`` / ``sample_tokens``; vLLM's ``CPUModelRunner`` inherits them). Those are not
stable across vLLM releases: the plugin runs only on the versions in :data:`SUPPORTED_VLLM` and
refuses a press on any other.
"""

from __future__ import annotations

import functools
import logging

from mmshiftkv.vllm.config import EngineConfigError, VLLMPressConfig, check_engine_config

logger = logging.getLogger(__name__)

#: vLLM releases whose internals the plugin was written against and tested on: ``>= low, < high``.
SUPPORTED_VLLM = ((0, 32), (0, 33))

_registered = False


def vllm_version_supported(version: str) -> bool:
    """Whether ``version`` (a vLLM ``__version__``) is in :data:`SUPPORTED_VLLM`."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    low, high = SUPPORTED_VLLM
    return low <= tuple(parts) < high


def _unsupported_message(version: str) -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_VLLM
    return (
        f"mmshiftkv.vllm supports vLLM >={lo_major}.{lo_minor},<{hi_major}.{hi_minor}; "
        f"this is vLLM {version}. "
        "Install a supported vLLM or remove the 'mmshiftkv' section from additional_config"
    )


def register() -> None:
    """Install the plugin's hooks into vLLM (idempotent; vLLM may call it several times per process)."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    supported = vllm_version_supported(vllm.__version__)
    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(create_engine_config)
    def checked_create_engine_config(self, *args, **kwargs):
        vllm_config = create_engine_config(self, *args, **kwargs)
        if VLLMPressConfig.from_vllm_config(vllm_config) is not None:
            if not supported:
                raise EngineConfigError(_unsupported_message(vllm.__version__))
            check_engine_config(vllm_config)
        return vllm_config

    EngineArgs.create_engine_config = checked_create_engine_config
    if not supported:
        logger.warning("%s; engines without a press are unaffected", _unsupported_message(vllm.__version__))
        return
    _patch_scheduler()
    _patch_model_runner()


def _press_config(vllm_config) -> VLLMPressConfig | None:
    config = VLLMPressConfig.from_vllm_config(vllm_config)
    if config is not None:
        check_engine_config(vllm_config)
    return config


def _patch_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from mmshiftkv.vllm.scheduler import BlockLedger

    init, after_schedule, update = (
        Scheduler.__init__,
        Scheduler._update_after_schedule,
        Scheduler.update_from_output,
    )

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        config = _press_config(self.vllm_config)
        if config is not None:
            self.mmshiftkv_ledger = BlockLedger(
                self, config.budget, record_blocks=config.record_blocks, record_limit=config.record_limit
            )

    @functools.wraps(after_schedule)
    def _update_after_schedule(self, scheduler_output):
        ledger = getattr(self, "mmshiftkv_ledger", None)
        if ledger is not None:
            ledger.step_scheduled(scheduler_output)
        return after_schedule(self, scheduler_output)

    @functools.wraps(update)
    def update_from_output(self, scheduler_output, model_runner_output):
        ledger = getattr(self, "mmshiftkv_ledger", None)
        if ledger is None:
            return update(self, scheduler_output, model_runner_output)
        ledger.step_finished()
        failed = ledger.finish_failed(model_runner_output)
        outputs = update(self, scheduler_output, model_runner_output)
        ledger.report_failed(outputs, failed)
        ledger.record()
        return outputs

    Scheduler.__init__ = __init__
    Scheduler._update_after_schedule = _update_after_schedule
    Scheduler.update_from_output = update_from_output


def _patch_model_runner() -> None:
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from mmshiftkv.vllm.scheduler import FAILURES_ATTRIBUTE
    from mmshiftkv.vllm.worker import Compactor

    initialize, update_states, prepare, execute, sample = (
        GPUModelRunner.initialize_kv_cache,
        GPUModelRunner._update_states,
        GPUModelRunner._prepare_inputs,
        GPUModelRunner.execute_model,
        GPUModelRunner.sample_tokens,
    )

    @functools.wraps(initialize)
    def initialize_kv_cache(self, *args, **kwargs):
        result = initialize(self, *args, **kwargs)
        if getattr(self, "mmshiftkv_compactor", None) is None:
            config = _press_config(self.vllm_config)
            if config is not None:
                self.mmshiftkv_compactor = Compactor.for_runner(self, config)
        return result

    @functools.wraps(update_states)
    def _update_states(self, scheduler_output):
        compactor = getattr(self, "mmshiftkv_compactor", None)
        if compactor is None:
            return update_states(self, scheduler_output)
        compactor.trim_block_table(self)
        result = update_states(self, scheduler_output)
        compactor.forget_finished(self)
        return result

    @functools.wraps(prepare)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = prepare(self, scheduler_output, num_scheduled_tokens)
        compactor = getattr(self, "mmshiftkv_compactor", None)
        if compactor is not None:
            compactor.prepare(self, num_scheduled_tokens)
        return result

    @functools.wraps(execute)
    def execute_model(self, *args, **kwargs):
        compactor = getattr(self, "mmshiftkv_compactor", None)
        if compactor is None:
            return execute(self, *args, **kwargs)
        try:
            result = execute(self, *args, **kwargs)
        except BaseException:
            compactor.abandon_step()
            raise
        compactor.finish_step()
        return result

    @functools.wraps(sample)
    def sample_tokens(self, *args, **kwargs):
        output = sample(self, *args, **kwargs)
        compactor = getattr(self, "mmshiftkv_compactor", None)
        if compactor is not None:
            # Read after sampling, which waited for the step: no extra synchronisation.
            failures = compactor.take_failures()
            if failures and isinstance(output, ModelRunnerOutput):
                setattr(output, FAILURES_ATTRIBUTE, failures)
        return output

    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
