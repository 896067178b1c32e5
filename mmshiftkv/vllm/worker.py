"""Worker side: score each finished prompt with the press and compact its KV into the leading slots.

In the step where a request's prompt is complete (prefilled whole, or its last chunk under
chunked prefill), every decoder layer, right after its attention has run, scores the prompt
tokens with the press's own ``score()`` (through :class:`~mmshiftkv.vllm.adapter.VLLMAdapter`),
selects the kept tokens with :func:`~mmshiftkv.presses.select_kept_indices` and rewrites the
request's first slots: slot ``j`` of KV head ``h`` receives the ``j``-th kept token of that head
(each head its own tokens), then any tokens after the prompt (the replayed output of a preempted
request) follow unchanged.

Chunked prefill: a prompt scheduled over several steps keeps a
:class:`~mmshiftkv.presses.chunked.ChunkedPrefill` on the worker from its first chunk to its last.
Each chunk adds, per layer, what the press declares it needs (its trailing attention-input rows,
:attr:`~mmshiftkv.presses.base.BudgetedPress.prefill_rows`, and its running statistics,
:meth:`~mmshiftkv.presses.base.BudgetedPress.accumulate_chunk`); earlier chunks hold all their
slots. At the last chunk the press scores the whole prompt from that state and the keys and values
of every chunk, read back from the paged cache (:mod:`mmshiftkv.vllm.paged`: a layout learned from
the backend's own writes at engine start), and the rewrite of slots ``0 .. physical_len - 1`` spans
the earlier chunks' blocks. The state per request is ``ChunkedPrefill.nbytes`` (ShiftKV: about
``8 x hidden`` activations per layer plus the positions, 8 bytes per prompt token or 24 with
M-RoPE; SnapKV: ``window x hidden`` per layer); it leaves with the prompt's last chunk, a
preemption (the request restarts from scratch) or the request's end.

From then on the request has two lengths. Its *logical* length (the scheduler's
``num_computed_tokens``) gives RoPE positions: generated token ``i`` still sits at position
``prompt_len + i`` (M-RoPE: vLLM's ``mrope_position_delta`` applies as usual). Its *physical*
length, ``shift`` tokens shorter, gives the slots new keys are written to and the sequence length
the attention kernel reads. :meth:`Compactor.prepare` applies the shift to the runner's slot
mapping and sequence lengths after vLLM prepared them (one vectorised update per step); the
emptied blocks leave the worker's block table before the next step fills it
(:meth:`Compactor.trim_block_table`) and the scheduler's KV manager in
:mod:`mmshiftkv.vllm.scheduler`, which applies the same rule (both sides know the physical
length: ``min(prompt_len, budget)`` plus what follows the prompt).

The writes go through the attention backend's own ``do_kv_cache_update``, so the block layout
(which differs by backend and CPU ISA) is never assumed.

On GPUs (untested here: no GPU backend runs on this project's CPU machines) the design avoids
three hazards: the pinned block table is never written while the step's copy of it to the device
may be pending, the shifts cost one host-to-device copy and a few batched kernels per step rather
than kernels per request, and NaN scores are accumulated on the device and read once per step,
after sampling, instead of synchronising per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mmshiftkv.presses import select_kept_indices
from mmshiftkv.presses.base import ScoringState
from mmshiftkv.presses.chunked import ChunkedPrefill
from mmshiftkv.vllm.adapter import AttentionView, VLLMAdapter
from mmshiftkv.vllm.config import EngineConfigError, VLLMPressConfig
from mmshiftkv.vllm.paged import PagedLayout, check_layer, learn_layout
from mmshiftkv.vllm.records import RecentRecords


@dataclass
class PromptStep:
    """A request whose prompt, longer than the budget, is prefilled (whole or in part) in the current step.

    Attributes
    ----------
    req_id : str
        vLLM's request id.
    row : int
        Its row in the runner's input batch (and block table) during this step.
    start : int
        Index of its first token in the step's flat token batch.
    prompt_len : int
        Prompt tokens ``T``.
    n_scheduled : int
        Tokens it runs in this step (more than the prompt's rest when a preempted request replays
        its output).
    kept : int
        Prompt tokens each KV head keeps, ``min(T, budget)``.
    computed : int
        Tokens whose KV it held before this step (0: the prompt starts here).
    chunked : ChunkedPrefill or None
        The prompt's state across chunks; None when this step prefills it whole (or the state is
        missing: the request then fails).
    block_ids : torch.Tensor or None
        Under chunked prefill, at the last chunk: the request's blocks ``(blocks,)`` in order.
    slots : torch.Tensor or None
        With ``block_ids``: the cache slots of physical positions ``0 .. physical_len - 1``
        ``(physical_len,)``, which the compaction rewrites in every layer.
    """

    req_id: str
    row: int
    start: int
    prompt_len: int
    n_scheduled: int
    kept: int
    computed: int = 0
    chunked: ChunkedPrefill | None = None
    block_ids: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    @property
    def final(self) -> bool:
        """The prompt is complete after this step: it is scored and compacted in it."""
        return self.computed + self.n_scheduled >= self.prompt_len

    @property
    def whole(self) -> bool:
        """The whole prompt is prefilled in this step (scored from the step's own tensors)."""
        return self.computed == 0 and self.final

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens in this step."""
        return min(self.n_scheduled, self.prompt_len - self.computed)

    @property
    def shift(self) -> int:
        """Logical minus physical length after compaction."""
        return self.prompt_len - self.kept

    @property
    def physical_len(self) -> int:
        """Slots the request holds after compaction."""
        return self.computed + self.n_scheduled - self.shift


def compacts(num_computed: int, n_scheduled: int, prompt_len: int, budget: int) -> bool:
    """The rule scheduler and workers share: this step completes a prompt longer than the budget (the
    whole prompt, or its last chunk)."""
    return num_computed < prompt_len <= num_computed + n_scheduled and prompt_len > budget


@dataclass
class _LayerInput:
    positions: torch.Tensor
    hidden_states: torch.Tensor


#: Why a request fails when its scores hold NaN on this rank.
NAN_REASON = "the press scored NaN for real prompt tokens (the attention input holds NaN or inf)"
#: Why a request fails when its compaction failed on another tensor-parallel rank only.
OTHER_RANK_REASON = "its compaction failed on another tensor-parallel rank (see that worker's log)"


@dataclass
class _StepFailures:
    """One step's compactions and which failed, read after the step's sampling synchronised."""

    items: list[PromptStep]
    local: torch.Tensor
    combined: torch.Tensor
    errors: dict[int, str]


@dataclass
class Compactor:
    """The press, its hooks on one worker's model, and the per-request shifts.

    Built by the plugin when the runner's KV cache is initialised (see :mod:`mmshiftkv.vllm.plugin`).

    A request whose scoring fails (its scores hold NaN, or the press raises) is still compacted,
    with valid slots, so that the step's other requests run on; the worker reports it in the step's
    output (:meth:`take_failures`) and the scheduler finishes it with an error. Nothing raises inside
    the forward and nothing synchronises per layer: NaN scores set a device flag per request, read
    once per step after sampling (which waits for the step anyway). A press that raises on a
    prompt's earlier chunk fails the request the same way.

    Attributes
    ----------
    config : VLLMPressConfig
        The engine's press configuration.
    block_size : int
        Tokens per KV block of the (single) KV cache group.
    layout : PagedLayout
        Where the backend keeps each slot's keys and values (learned at engine start).
    shifts : dict[str, int]
        Per compacted request, its logical minus physical length.
    chunked : dict[str, ChunkedPrefill]
        Per request between the first and the last chunk of its prompt, what the press gathered so
        far (``ChunkedPrefill.nbytes`` each).
    selections : RecentRecords[str, dict[int, torch.Tensor]]
        With ``config.record_selection``: per request (the last ``config.record_limit`` compacted)
        and decoder layer index, the kept prompt token indices ``(kv_heads, kept)``, ascending per head.
    """

    config: VLLMPressConfig
    block_size: int
    views: dict[nn.Module, AttentionView]
    adapter: VLLMAdapter
    layout: PagedLayout
    shifts: dict[str, int] = field(default_factory=dict)
    chunked: dict[str, ChunkedPrefill] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.press = self.config.build_press()
        self.selections: RecentRecords[str, dict[int, torch.Tensor]] = RecentRecords(self.config.record_limit)
        self.plan: list[PromptStep] = []
        self._inputs: dict[int, _LayerInput] = {}
        # Whether this step's chunks were registered with their ChunkedPrefill (at the first layer).
        self._chunks_added = False
        # Per layer of the step, (len(plan),) bool: the scores held NaN; per plan index, why the press raised.
        self._nan: list[torch.Tensor] = []
        self._errors: dict[int, str] = {}
        self._failures: _StepFailures | None = None
        # Block-table rows to shorten before the next step fills the table: (request id, blocks kept).
        self._trims: list[tuple[str, int]] = []
        # The hooks live as long as the engine's model.
        for view in self.views.values():
            view.module.register_forward_pre_hook(self._capture_input, with_kwargs=True)
            view.module.attn.register_forward_hook(self._compact_layer)
        self._by_attn = {view.module.attn: view for view in self.views.values()}

    @classmethod
    def for_runner(cls, runner, config: VLLMPressConfig) -> Compactor:
        """Find the decoder attention layers of ``runner.model`` and hook them."""
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.v1.attention.backend import AttentionType

        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise EngineConfigError(
                "mmshiftkv.vllm supports models with one KV cache group (full attention in every layer); "
                f"this model has {len(groups)} (sliding-window or hybrid layers)"
            )
        block_size = groups[0].kv_cache_spec.block_size
        table_block_size = runner.input_batch.block_table.block_tables[0].block_size
        if table_block_size != block_size:
            raise EngineConfigError(
                f"mmshiftkv.vllm: the attention kernel's block size ({table_block_size}) "
                f"differs from the KV manager's ({block_size}); pass block_size={table_block_size}"
            )
        decoder_layers = [
            m
            for m in runner.model.modules()
            if isinstance(m, Attention) and m.attn_type == AttentionType.DECODER
        ]
        views = {}
        for module in runner.model.modules():
            attn = getattr(module, "attn", None)
            if not isinstance(attn, Attention) or attn.attn_type != AttentionType.DECODER:
                continue
            missing = [
                name
                for name in ("qkv_proj", "rotary_emb", "q_size", "num_heads", "head_dim")
                if not hasattr(module, name)
            ]
            if missing:
                raise EngineConfigError(
                    f"mmshiftkv.vllm cannot score {type(module).__name__}: it has no {', '.join(missing)} "
                    "(supported: decoders with a fused qkv_proj and a rotary embedding, "
                    "e.g. Llama, Qwen2, Qwen3, Qwen2-VL, Qwen3-VL)"
                )
            if attn.sliding_window is not None:
                raise EngineConfigError(
                    f"mmshiftkv.vllm: {attn.layer_name} is a sliding-window layer (not supported)"
                )
            views[module] = AttentionView(
                module, extract_layer_index(attn.layer_name), float(attn.impl.scale)
            )
        if not views or len(views) != len(decoder_layers):
            raise EngineConfigError(
                f"mmshiftkv.vllm found {len(views)} scorable attention modules "
                f"for {len(decoder_layers)} decoder attention layers; "
                "this model's structure is not supported"
            )
        first = next(iter(views))
        layout = learn_layout(first.attn, first.attn.kv_cache, block_size, runner.dtype)
        for view in views:
            check_layer(layout, view.attn, view.attn.kv_cache)
        adapter = VLLMAdapter(
            n_heads=first.num_heads,
            n_kv_heads=first.num_kv_heads,
            n_layers=len(views),
            rotation_style="half" if first.rotary_emb.is_neox_style else "pairwise",
        )
        return cls(config=config, block_size=block_size, views=views, adapter=adapter, layout=layout)

    # ------------------------------------------------------------------ steps
    def trim_block_table(self, runner) -> None:
        """Before vLLM's ``_update_states``: drop the blocks compaction emptied from the worker's block table.

        Not at the end of the compacting step: that step's copy of the (pinned) table to the device
        may still be pending then. Here it is done (vLLM waited for the previous step's sampled
        tokens, or for its ``prepare_inputs_event``), and vLLM has not yet appended the blocks the
        scheduler allocated since, which follow the kept ones.
        """
        if not self._trims:
            return
        batch = runner.input_batch
        table = batch.block_table.block_tables[0]
        for req_id, keep in self._trims:
            row = batch.req_id_to_index.get(req_id)
            if row is None:  # finished or preempted meanwhile
                continue
            held = int(table.num_blocks_per_row[row])
            table.block_table.np[row, keep:held] = 0
            table.num_blocks_per_row[row] = min(keep, held)
            del runner.requests[req_id].block_ids[0][keep:]
        self._trims = []

    def forget_finished(self, runner) -> None:
        """After vLLM's ``_update_states``: drop the shifts and chunk states of requests that left.

        Finished and aborted requests (a failed one included) are gone from ``runner.requests`` then;
        a preempted request stays there and restarts its state when it is scheduled from scratch.
        """
        for held in (self.shifts, self.chunked):
            for req_id in [req_id for req_id in held if req_id not in runner.requests]:
                del held[req_id]

    def prepare(self, runner, num_scheduled_tokens: np.ndarray) -> None:
        """After vLLM's ``_prepare_inputs``: plan the step's prompts, apply earlier compactions' shifts.

        The shifts reach the device as one copy per step: sequence lengths and slot mappings are
        corrected by vectorised ops over the batch, not per request.
        """
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        starts = runner.query_start_loc.np[:num_reqs]
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        prompt_lens = batch.num_prompt_tokens[:num_reqs]
        self.plan = []
        self._chunks_added = False
        # Rows (re)starting from scratch (new, or preempted and recomputed) hold all their slots.
        for row in np.flatnonzero(computed == 0):
            self.shifts.pop(req_ids[row], None)
            self.chunked.pop(req_ids[row], None)
        budget = self.config.budget
        for row in np.flatnonzero((computed < prompt_lens) & (prompt_lens > budget)):
            req_id, prompt_len = req_ids[row], int(prompt_lens[row])
            step = PromptStep(
                req_id,
                int(row),
                int(starts[row]),
                prompt_len,
                int(num_scheduled_tokens[row]),
                min(prompt_len, budget),
                int(computed[row]),
            )
            self.plan.append(step)
            if step.whole:
                continue
            if step.computed == 0:
                self.chunked[req_id] = ChunkedPrefill(self.press, self.adapter, prompt_len)
            step.chunked = self.chunked.get(req_id)
            if step.chunked is None or step.chunked.length != step.computed:
                self._errors[len(self.plan) - 1] = (
                    f"the worker holds {0 if step.chunked is None else step.chunked.length} of the "
                    f"{step.computed} prompt tokens computed before this chunk"
                )
                step.chunked = None
            if step.final:
                table = batch.block_table.block_tables[0]
                blocks = table.block_table.np[row, : table.num_blocks_per_row[row]].astype(np.int64)
                physical = np.arange(step.physical_len)
                slots = blocks[physical // self.block_size] * self.block_size + physical % self.block_size
                step.block_ids = torch.from_numpy(blocks).to(runner.seq_lens.device)
                step.slots = torch.from_numpy(slots).to(runner.seq_lens.device)
        row_shift = np.zeros(num_reqs, dtype=np.int32)
        for req_id, shift in self.shifts.items():
            row = batch.req_id_to_index.get(req_id)
            if row is not None and row < num_reqs:
                row_shift[row] = shift
        if not row_shift.any():
            return
        host_shift = torch.from_numpy(row_shift)
        runner.optimistic_seq_lens_cpu[:num_reqs] -= host_shift
        shift = host_shift.to(runner.seq_lens.device, non_blocking=True)
        runner.seq_lens[:num_reqs] -= shift
        total = int(num_scheduled_tokens[:num_reqs].sum())
        token_shift = shift.index_select(0, runner.req_indices.gpu[:total])
        batch.block_table.compute_slot_mapping(
            num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], runner.positions[:total] - token_shift
        )

    def finish_step(self) -> None:
        """After the step's forward: remember its shifts, the table rows to trim, which prompts failed."""
        if not self.plan:
            return
        local = torch.stack(self._nan).any(0)
        if self._errors:
            raised = torch.zeros(len(self.plan), dtype=torch.bool)
            raised[list(self._errors)] = True
            local = local | raised.to(local.device)
        self._failures = _StepFailures(self.plan, local, _any_rank(local), self._errors)
        for step in self.plan:
            if step.final:
                self._trims.append((step.req_id, -(-step.physical_len // self.block_size)))
                self.shifts[step.req_id] = step.shift
                self.chunked.pop(step.req_id, None)
        self.abandon_step()

    def abandon_step(self) -> None:
        """Forget the step's plan and per-layer state (after the forward, or when it raised)."""
        self.plan = []
        self._inputs.clear()
        self._nan = []
        self._errors = {}

    def take_failures(self) -> dict[str, str]:
        """After the step's sampling: request id -> reason, for each prompt of the step that failed."""
        failures, self._failures = self._failures, None
        if failures is None:
            return {}
        local, combined = failures.local.tolist(), failures.combined.tolist()
        return {
            step.req_id: failures.errors.get(i) or (NAN_REASON if local[i] else OTHER_RANK_REASON)
            for i, step in enumerate(failures.items)
            if combined[i]
        }

    # ------------------------------------------------------------------ hooks
    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.plan:
            return
        positions = kwargs.get("positions", args[0] if args else None)
        hidden_states = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
        self._inputs[self.views[module].layer_idx] = _LayerInput(positions, hidden_states)
        if not self._chunks_added:  # the step's first layer: its positions are every layer's
            self._chunks_added = True
            for index, step in enumerate(self.plan):
                if step.chunked is not None and index not in self._errors:
                    try:
                        step.chunked.add_chunk(step.prompt_tokens, _positions_of(positions, step))
                    except Exception as error:  # one request's failure must not stop the engine
                        self._fail(index, None, error)

    def _compact_layer(self, attn: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self.plan:
            return
        from vllm.model_executor.layers.attention.attention import get_attention_context

        view = self._by_attn[attn]
        captured = self._inputs.pop(view.layer_idx)
        keys = args[1].view(-1, attn.num_kv_heads, attn.head_size)
        values = args[2].view(-1, attn.num_kv_heads, attn.head_size_v)
        _, _, kv_cache, slot_mapping = get_attention_context(attn.layer_name)
        new_keys, new_values, slots, nan = [], [], [], []
        for index, step in enumerate(self.plan):
            if step.chunked is not None:
                self._add_chunk_layer(view, captured, step, index)
            if not step.final:
                nan.append(torch.zeros((), dtype=torch.bool, device=keys.device))
                continue
            if step.whole:  # the whole prompt is in this step's tensors
                held_keys = keys[step.start : step.start + step.n_scheduled]
                held_values = values[step.start : step.start + step.n_scheduled]
                # The step's own slots of physical positions 0 .. physical_len - 1 (the prompt starts at 0).
                slots.append(slot_mapping[step.start : step.start + step.physical_len])
            else:  # earlier chunks' keys and values are in the paged cache, this step's too by now
                logical = step.computed + step.n_scheduled
                held_keys, held_values = self.layout.read(kv_cache, step.block_ids, logical)
                slots.append(step.slots)
            scores = self._scores(view, captured, held_keys, held_values, step, index)
            nan.append(torch.isnan(scores).any())
            kept = select_kept_indices(scores, step.kept)[0][0]
            if self.config.record_selection:
                layers = self.selections.get(step.req_id)
                if layers is None:
                    layers = self.selections[step.req_id] = {}
                layers[view.layer_idx] = kept.cpu()
            gather = kept.T[..., None]  # (kept, kv_heads, 1): slot j of head h <- token kept[h, j]
            new_keys.append(held_keys[: step.prompt_len].gather(0, gather.expand(-1, -1, keys.shape[-1])))
            new_values.append(
                held_values[: step.prompt_len].gather(0, gather.expand(-1, -1, values.shape[-1]))
            )
            new_keys.append(held_keys[step.prompt_len :])  # replayed output of a preempted request
            new_values.append(held_values[step.prompt_len :])
        self._nan.append(torch.stack(nan))
        if slots:
            attn.impl.do_kv_cache_update(
                attn, torch.cat(new_keys), torch.cat(new_values), kv_cache, torch.cat(slots)
            )

    def _add_chunk_layer(
        self, view: AttentionView, captured: _LayerInput, step: PromptStep, index: int
    ) -> None:
        """Fold this step's chunk of one layer into the prompt's :class:`ChunkedPrefill`."""
        if index in self._errors:
            return
        rows = captured.hidden_states[step.start : step.start + step.prompt_tokens]
        try:
            # A copy: the rows the press keeps outlive this step's activations. No served press reads the
            # keys so far while accumulating (they are read once, at the last chunk).
            step.chunked.add_layer(view, rows[None].clone(), None)
        except Exception as error:  # one request's failure must not stop the engine
            self._fail(index, view, error)

    def _scores(
        self,
        view: AttentionView,
        captured: _LayerInput,
        keys: torch.Tensor,
        values: torch.Tensor,
        step: PromptStep,
        index: int,
    ) -> torch.Tensor:
        """The press's scores ``(1, kv_heads, prompt_len)`` of one request's prompt in one layer.

        ``keys`` and ``values`` ``(tokens, kv_heads, head_dim)`` start at the prompt's first token.
        When the press raises, the request is marked failed and scored zeros (any valid selection
        serves: the scheduler finishes it with an error once the step's output arrives).
        """
        expected = (1, keys.shape[1], step.prompt_len)
        if index in self._errors:
            return torch.zeros(expected, device=keys.device)
        prompt_keys = keys[: step.prompt_len].transpose(0, 1)[None]
        prompt_values = values[: step.prompt_len].transpose(0, 1)[None]
        try:
            if step.whole:
                state = ScoringState(
                    adapter=self.adapter, key_mask=None, positions=_positions_of(captured.positions, step)
                )
                hidden_states = captured.hidden_states[step.start : step.start + step.prompt_len][None]
            else:
                state, hidden_states = step.chunked.prompt_state(), step.chunked.attention_input(view)
            with self.press.scoring(state):
                scores = self.press.score(view, hidden_states, prompt_keys, prompt_values, None, {})
            if tuple(scores.shape) != expected:
                raise RuntimeError(f"score returned shape {tuple(scores.shape)}, expected {expected}")
        except Exception as error:  # one request's failure must not stop the engine
            self._fail(index, view, error)
            return torch.zeros(expected, device=keys.device)
        return scores

    def _fail(self, index: int, view: AttentionView | None, error: Exception) -> None:
        """Mark the step's ``index``-th prompt failed (the first reason is kept)."""
        where = "" if view is None else f" in layer {view.layer_idx}"
        self._errors.setdefault(
            index, f"{type(self.press).__name__} failed{where}: {type(error).__name__}: {error}"
        )


def _positions_of(positions: torch.Tensor, step: PromptStep) -> torch.Tensor:
    """The step's prompt tokens' positions as presses take them: ``(1, n)``, or ``(3, 1, n)`` for M-RoPE."""
    rows = slice(step.start, step.start + step.prompt_tokens)
    return positions[:, rows][:, None] if positions.dim() == 2 else positions[rows][None]


def _any_rank(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` OR-ed over the tensor-parallel ranks (each rank scores its own KV heads)."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    if get_tensor_model_parallel_world_size() == 1:
        return flags
    return get_tp_group().all_reduce(flags.float()) > 0
