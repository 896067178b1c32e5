"""Scheduler side: return a compacted request's emptied KV blocks to the pool, size later allocations,
and finish the requests whose compaction failed.

vLLM's KV manager sizes a request's blocks from its token count (``num_computed_tokens`` + new
tokens). After compaction (:mod:`mmshiftkv.vllm.worker`) a request needs ``shift`` fewer slots
than that count, where ``shift = prompt_len - min(prompt_len, budget)``: the scheduler knows it
without asking the workers, because the budget is uniform. :class:`BlockLedger`

* notes, when a step is scheduled, the requests whose prompt it completes (the whole prompt, or
  its last chunk under chunked prefill: :func:`~mmshiftkv.vllm.worker.compacts`, the rule the
  workers apply); a prompt's earlier chunks hold all their slots;
* when that step's output arrives (the workers have compacted by then), frees each such request's
  blocks beyond ``ceil(physical_len / block_size)`` into the block pool;
* subtracts the shift from every later allocation of the request, so a decode step asks for a new
  block only when the *physical* length crosses a block boundary;
* keeps the peak number of blocks in use and of running requests, and, with ``record_blocks``,
  the blocks each of the last ``record_limit`` requests held after every step.

A request whose compaction failed on a worker (its scores were NaN, its press raised: the worker
reports it in the step's output, see :meth:`Compactor.take_failures
<mmshiftkv.vllm.worker.Compactor.take_failures>`) is finished with vLLM's error status before the
step's output is processed (:meth:`BlockLedger.finish_failed`): it returns no token from that step,
its output ends with ``finish_reason="error"`` and the reason as ``stop_reason``, and the other
requests of the step continue.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from mmshiftkv.vllm.config import EngineConfigError
from mmshiftkv.vllm.records import RecentRecords
from mmshiftkv.vllm.worker import compacts

logger = logging.getLogger(__name__)

#: Attribute of vLLM's ``ModelRunnerOutput`` carrying the failed compactions, request id -> reason.
FAILURES_ATTRIBUTE = "mmshiftkv_failures"


@dataclass
class BlockRecord:
    """One request's KV after one step, read from vLLM's KV manager.

    Attributes
    ----------
    prompt_len : int
        Prompt tokens.
    tokens : int
        Logical tokens whose KV the request holds (``num_computed_tokens``).
    blocks : int
        Blocks the KV manager holds for it.
    preemptions : int
        Times vLLM preempted it so far (each time it freed all its blocks and recomputed).
    """

    prompt_len: int
    tokens: int
    blocks: int
    preemptions: int = 0


@dataclass
class BlockLedger:
    """Per-engine bookkeeping of compacted requests on the scheduler (one per ``Scheduler``).

    Parameters
    ----------
    scheduler : vllm.v1.core.sched.scheduler.Scheduler
        The engine's scheduler.
    budget : int or None
        The press's budget; None records blocks without compacting (a baseline engine).
    record_blocks : bool, default=False
        Keep :attr:`history` and :attr:`usage`.
    record_limit : int, default=1024
        Requests in :attr:`history` and steps in :attr:`usage`, the most recent ones.

    Attributes
    ----------
    shifts : dict[str, int]
        Per compacted request still holding blocks, its logical minus physical length.
    history : RecentRecords[str, list[BlockRecord]]
        With ``record_blocks``: per request (the last ``record_limit`` to start), its KV after
        every step it ran in.
    usage : collections.deque[tuple[int, int]]
        With ``record_blocks``: after each of the last ``record_limit`` steps, blocks in use in the
        pool and blocks the running requests hold (equal when no emptied block is left behind).
    peak_blocks : int
        Most blocks in use at once (the null block excluded), a step's prefill allocations included.
    peak_running : int
        Most requests running at once.
    failed : int
        Requests finished with an error because their compaction failed.
    """

    scheduler: object
    budget: int | None
    record_blocks: bool = False
    record_limit: int = 1024
    shifts: dict[str, int] = field(default_factory=dict)
    peak_blocks: int = 0
    peak_running: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        manager = self.scheduler.kv_cache_manager
        coordinator = manager.coordinator
        if len(coordinator.single_type_managers) != 1:
            raise EngineConfigError(
                "mmshiftkv.vllm supports models with one KV cache group (full attention in every layer); "
                f"this model has {len(coordinator.single_type_managers)}"
            )
        self.history: RecentRecords[str, list[BlockRecord]] = RecentRecords(self.record_limit)
        self.usage: deque[tuple[int, int]] = deque(maxlen=self.record_limit)
        self._blocks = coordinator.single_type_managers[0]
        self.block_size = self._blocks.block_size
        self._pool = manager.block_pool
        self._pending: dict[str, tuple[int, int]] = {}
        self._wrap_manager(manager, coordinator)

    def _wrap_manager(self, manager, coordinator) -> None:
        # Instance attributes, so only this engine's KV manager changes. Every allocation of a request
        # goes through these two coordinator calls with its token count.
        count_blocks, allocate, free = (
            coordinator.get_num_blocks_to_allocate,
            coordinator.allocate_new_blocks,
            manager.free,
        )

        def get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs):
            shift = self.shifts.get(request_id, 0)
            if shift and "num_tokens_main_model" in kwargs:
                kwargs["num_tokens_main_model"] -= shift
            return count_blocks(request_id, num_tokens - shift, *args, **kwargs)

        def allocate_new_blocks(request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
            shift = self.shifts.get(request_id, 0)
            return allocate(request_id, num_tokens - shift, num_tokens_main_model - shift, *args, **kwargs)

        def free_request(request):
            self.shifts.pop(request.request_id, None)
            self._pending.pop(request.request_id, None)
            return free(request)

        coordinator.get_num_blocks_to_allocate = get_num_blocks_to_allocate
        coordinator.allocate_new_blocks = allocate_new_blocks
        manager.free = free_request

    def step_scheduled(self, scheduler_output) -> None:
        """Before vLLM advances ``num_computed_tokens``: note the prompts this step compacts."""
        if self.budget is None:
            return
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            computed, prompt_len = request.num_computed_tokens, request.num_prompt_tokens
            if compacts(computed, n, prompt_len, self.budget):
                shift = prompt_len - self.budget
                self._pending[req_id] = (shift, computed + n - shift)

    def step_finished(self) -> None:
        """When the step's output arrives, before vLLM processes it: free the blocks compaction emptied."""
        self._note_usage()
        for req_id, (shift, physical_len) in self._pending.items():
            blocks = self._blocks.req_to_blocks.get(req_id)
            if blocks is None:
                continue
            keep = -(-physical_len // self.block_size)
            emptied = blocks[keep:]
            del blocks[keep:]
            # Tail first, as vLLM frees (its eviction order).
            self._pool.free_blocks(reversed(emptied))
            self.shifts[req_id] = shift
        self._pending.clear()

    def finish_failed(self, model_runner_output) -> list:
        """Finish with an error the requests whose compaction failed in this step, before vLLM reads
        the step's output (so none of them returns a token from it); the finished requests."""
        from vllm.v1.request import RequestStatus

        failures = getattr(model_runner_output, FAILURES_ATTRIBUTE, {})
        if not failures:
            return []
        requests = self.scheduler.finish_requests(failures, RequestStatus.FINISHED_ERROR)
        for request in requests:
            request.stop_reason = f"mmshiftkv: {failures[request.request_id]}"
            logger.error(
                "mmshiftkv.vllm: request %s failed (%s); "
                "it is finished with an error, the other requests continue",
                request.request_id,
                failures[request.request_id],
            )
        self.failed += len(requests)
        return requests

    @staticmethod
    def report_failed(engine_core_outputs: dict, requests: list) -> None:
        """Add each failed request's final output (no new token, ``finish_reason="error"``)."""
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

        for request in requests:
            outputs = engine_core_outputs.setdefault(request.client_index, EngineCoreOutputs())
            outputs.outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    stop_reason=request.stop_reason,
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )

    def record(self) -> None:
        """After vLLM processed the step's output: peaks, and with ``record_blocks`` what requests hold."""
        in_use = self._note_usage()
        if not self.record_blocks:
            return
        held = 0
        for request in self.scheduler.running:
            blocks = len(self._blocks.req_to_blocks.get(request.request_id, ()))
            held += blocks
            record = BlockRecord(
                request.num_prompt_tokens, request.num_computed_tokens, blocks, request.num_preemptions
            )
            records = self.history.get(request.request_id)
            if records is None:
                self.history[request.request_id] = [record]
            else:
                records.append(record)
        self.usage.append((in_use, held))

    def blocks_in_use(self) -> int:
        """Blocks taken from the pool (the null block excluded): none once every request finished."""
        # The pool's null block is never free and never holds KV.
        return self._pool.num_gpu_blocks - self._pool.get_num_free_blocks() - 1

    def _note_usage(self) -> int:
        in_use = self.blocks_in_use()
        self.peak_blocks = max(self.peak_blocks, in_use)
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        return in_use
