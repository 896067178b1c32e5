"""Scheduler side: return a compacted request's emptied KV blocks to the pool and size later allocations.

vLLM's KV manager sizes a request's blocks from its token count (``num_computed_tokens`` + new
tokens). After compaction (:mod:`mmshiftkv.vllm.worker`) a request needs ``shift`` fewer slots
than that count, where ``shift = prompt_len - min(prompt_len, budget)``: the scheduler knows it
without asking the workers, because the budget is uniform. :class:`BlockLedger`

* notes, when a step is scheduled, the requests whose whole prompt it prefills
  (:func:`~mmshiftkv.vllm.worker.compacts`, the rule the workers apply);
* when that step's output arrives (the workers have compacted by then), frees each such request's
  blocks beyond ``ceil(physical_len / block_size)`` into the block pool;
* subtracts the shift from every later allocation of the request, so a decode step asks for a new
  block only when the *physical* length crosses a block boundary;
* records the blocks each request holds after every step, as the KV manager reports them, and
  the peak number of blocks in use (what the benchmark and the tests read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmshiftkv.vllm.config import EngineConfigError
from mmshiftkv.vllm.worker import compacts


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

    Attributes
    ----------
    shifts : dict[str, int]
        Per compacted request still holding blocks, its logical minus physical length.
    history : dict[str, list[BlockRecord]]
        Per request, its KV after every step it ran in.
    peak_blocks : int
        Most blocks in use at once (the null block excluded), a step's prefill allocations included.
    peak_running : int
        Most requests running at once.
    usage : list[tuple[int, int]]
        After every step: blocks in use in the pool, and blocks the running requests hold (equal
        when no emptied block is left behind).
    """

    scheduler: object
    budget: int | None
    shifts: dict[str, int] = field(default_factory=dict)
    history: dict[str, list[BlockRecord]] = field(default_factory=dict)
    peak_blocks: int = 0
    peak_running: int = 0
    usage: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        manager = self.scheduler.kv_cache_manager
        coordinator = manager.coordinator
        if len(coordinator.single_type_managers) != 1:
            raise EngineConfigError(
                "mmshiftkv.vllm supports models with one KV cache group (full attention in every layer); "
                "this model has "
                f"{len(coordinator.single_type_managers)}"
            )
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
            if compacts(request.num_computed_tokens, n, request.num_prompt_tokens, self.budget):
                shift = request.num_prompt_tokens - self.budget
                self._pending[req_id] = (shift, n - shift)

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

    def record(self) -> None:
        """After vLLM processed the step's output: what every running request holds."""
        held = 0
        for request in self.scheduler.running:
            blocks = len(self._blocks.req_to_blocks.get(request.request_id, ()))
            held += blocks
            self.history.setdefault(request.request_id, []).append(
                BlockRecord(
                    request.num_prompt_tokens, request.num_computed_tokens, blocks, request.num_preemptions
                )
            )
        self.usage.append((self._note_usage(), held))

    def _note_usage(self) -> int:
        # The pool's null block is never free and never holds KV.
        in_use = self._pool.num_gpu_blocks - self._pool.get_num_free_blocks() - 1
        self.peak_blocks = max(self.peak_blocks, in_use)
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        return in_use
