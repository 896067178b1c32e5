"""Worker side: score each finished prompt with the press and compact its KV into the leading slots.

In the step where a request's whole prompt is prefilled, every decoder layer, right after its
attention has run over the full prompt, scores the prompt tokens with the press's own
``score()`` (through :class:`~mmshiftkv.vllm.adapter.VLLMAdapter`), selects the kept tokens with
:func:`~mmshiftkv.presses.select_kept_indices` and rewrites the request's first slots: slot ``j``
of KV head ``h`` receives the ``j``-th kept token of that head (each head its own tokens), then
any tokens after the prompt (the replayed output of a preempted request) follow unchanged.

From then on the request has two lengths. Its *logical* length (the scheduler's
``num_computed_tokens``) gives RoPE positions: generated token ``i`` still sits at position
``prompt_len + i`` (M-RoPE: vLLM's ``mrope_position_delta`` applies as usual). Its *physical*
length, ``shift`` tokens shorter, gives the slots new keys are written to and the sequence length
the attention kernel reads. :meth:`Compactor.prepare` applies the shift to the runner's slot
mapping and sequence lengths after vLLM prepared them; the emptied blocks leave the worker's block
table here and the scheduler's KV manager in :mod:`mmshiftkv.vllm.scheduler`, which applies the
same rule (both sides know the physical length: ``min(prompt_len, budget)``).

The writes go through the attention backend's own ``do_kv_cache_update``, so the block layout
(which differs by backend and CPU ISA) is never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mmshiftkv.presses import select_kept_indices
from mmshiftkv.presses.base import ScoringState
from mmshiftkv.vllm.adapter import AttentionView, VLLMAdapter
from mmshiftkv.vllm.config import EngineConfigError, VLLMPressConfig


@dataclass
class PromptCompaction:
    """A request whose whole prompt is prefilled in the current step and longer than the budget.

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
        Tokens it runs in this step: ``T``, or more when a preempted request replays its output.
    kept : int
        Prompt tokens each KV head keeps, ``min(T, budget)``.
    """

    req_id: str
    row: int
    start: int
    prompt_len: int
    n_scheduled: int
    kept: int

    @property
    def shift(self) -> int:
        """Logical minus physical length after compaction."""
        return self.prompt_len - self.kept

    @property
    def physical_len(self) -> int:
        """Slots the request holds after compaction."""
        return self.n_scheduled - self.shift


def compacts(num_computed: int, n_scheduled: int, prompt_len: int, budget: int) -> bool:
    """The rule scheduler and workers share: this step prefills a whole prompt longer than the budget."""
    return num_computed == 0 and n_scheduled >= prompt_len > budget


def physical_blocks(prompt_len: int, n_tokens: int, budget: int, block_size: int) -> int:
    """Blocks a request holds for ``n_tokens`` logical tokens once its prompt is compacted."""
    physical = n_tokens - max(prompt_len - budget, 0)
    return -(-physical // block_size)


@dataclass
class _LayerInput:
    positions: torch.Tensor
    hidden_states: torch.Tensor


@dataclass
class Compactor:
    """The press, its hooks on one worker's model, and the per-request shifts.

    Built by the plugin when the runner's KV cache is initialised (see :mod:`mmshiftkv.vllm.plugin`).

    Attributes
    ----------
    config : VLLMPressConfig
        The engine's press configuration.
    block_size : int
        Tokens per KV block of the (single) KV cache group.
    shifts : dict[str, int]
        Per compacted request, its logical minus physical length.
    selections : dict[str, dict[int, torch.Tensor]]
        With ``config.record_selection``: per request and decoder layer index, the kept prompt
        token indices ``(kv_heads, kept)``, ascending per head.
    """

    config: VLLMPressConfig
    block_size: int
    views: dict[nn.Module, AttentionView]
    adapter: VLLMAdapter
    shifts: dict[str, int] = field(default_factory=dict)
    selections: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.press = self.config.build_press()
        self.plan: list[PromptCompaction] = []
        self._inputs: dict[int, _LayerInput] = {}
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
                f"mmshiftkv.vllm supports models with one KV cache group (full attention in every layer); "
                f"this model has {len(groups)} (sliding-window or hybrid layers)"
            )
        block_size = groups[0].kv_cache_spec.block_size
        table_block_size = runner.input_batch.block_table.block_tables[0].block_size
        if table_block_size != block_size:
            raise EngineConfigError(
                f"mmshiftkv.vllm: the attention kernel's block size ({table_block_size}) differs from the KV "
                f"manager's ({block_size}); pass block_size={table_block_size}"
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
                    "(supported: decoders with a fused qkv_proj and a rotary embedding, e.g. Llama, Qwen2, "
                    "Qwen2-VL)"
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
                f"mmshiftkv.vllm found {len(views)} scorable attention modules for {len(decoder_layers)} "
                "decoder "
                "attention layers; this model's structure is not supported"
            )
        first = next(iter(views))
        adapter = VLLMAdapter(
            n_heads=first.num_heads,
            n_kv_heads=first.num_kv_heads,
            n_layers=len(views),
            rotation_style="half" if first.rotary_emb.is_neox_style else "pairwise",
        )
        return cls(config=config, block_size=block_size, views=views, adapter=adapter)

    # ------------------------------------------------------------------ steps
    def prepare(self, runner, num_scheduled_tokens: np.ndarray) -> None:
        """After vLLM's ``_prepare_inputs``: plan the step's compactions, apply earlier ones' shifts."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        for req_id in [r for r in self.shifts if r not in runner.requests]:
            del self.shifts[req_id]
        starts = runner.query_start_loc.np[:num_reqs]
        token_shift = np.zeros(int(num_scheduled_tokens[:num_reqs].sum()), dtype=np.int64)
        self.plan = []
        for row, req_id in enumerate(batch.req_ids[:num_reqs]):
            computed = int(batch.num_computed_tokens_cpu[row])
            n = int(num_scheduled_tokens[row])
            prompt_len = runner.requests[req_id].num_prompt_tokens
            if computed == 0:
                # A request (re)starting from scratch (new, or preempted and recomputed) holds all its slots.
                self.shifts.pop(req_id, None)
            if compacts(computed, n, prompt_len, self.config.budget):
                kept = min(prompt_len, self.config.budget)
                self.plan.append(PromptCompaction(req_id, row, int(starts[row]), prompt_len, n, kept))
            shift = self.shifts.get(req_id, 0)
            if shift:
                runner.seq_lens[row] -= shift
                runner.optimistic_seq_lens_cpu[row] -= shift
                token_shift[starts[row] : starts[row] + n] = shift
        if token_shift.any():
            total = token_shift.shape[0]
            physical = runner.positions[:total] - torch.from_numpy(token_shift).to(runner.positions.device)
            batch.block_table.compute_slot_mapping(
                num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical
            )

    def finish_step(self, runner) -> None:
        """After the step: drop the emptied blocks from the worker's block table, remember the shifts."""
        table = runner.input_batch.block_table.block_tables[0]
        for item in self.plan:
            keep = -(-item.physical_len // self.block_size)
            held = int(table.num_blocks_per_row[item.row])
            table.block_table.np[item.row, keep:held] = 0
            table.num_blocks_per_row[item.row] = min(keep, held)
            state = runner.requests[item.req_id]
            del state.block_ids[0][keep:]
            self.shifts[item.req_id] = item.shift
        self.plan = []
        self._inputs.clear()

    # ------------------------------------------------------------------ hooks
    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.plan:
            return
        positions = kwargs.get("positions", args[0] if args else None)
        hidden_states = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
        self._inputs[self.views[module].layer_idx] = _LayerInput(positions, hidden_states)

    def _compact_layer(self, attn: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self.plan:
            return
        from vllm.model_executor.layers.attention.attention import get_attention_context

        view = self._by_attn[attn]
        captured = self._inputs.pop(view.layer_idx)
        keys = args[1].view(-1, attn.num_kv_heads, attn.head_size)
        values = args[2].view(-1, attn.num_kv_heads, attn.head_size_v)
        _, _, kv_cache, slot_mapping = get_attention_context(attn.layer_name)
        new_keys, new_values, slots = [], [], []
        for item in self.plan:
            kept = self._select(view, captured, keys, values, item)
            if self.config.record_selection:
                self.selections.setdefault(item.req_id, {})[view.layer_idx] = kept.cpu()
            prompt = slice(item.start, item.start + item.prompt_len)
            gather = kept.T[..., None]  # (kept, kv_heads, 1): slot j of head h <- token kept[h, j]
            new_keys.append(keys[prompt].gather(0, gather.expand(-1, -1, keys.shape[-1])))
            new_values.append(values[prompt].gather(0, gather.expand(-1, -1, values.shape[-1])))
            replayed = slice(item.start + item.prompt_len, item.start + item.n_scheduled)
            new_keys.append(keys[replayed])
            new_values.append(values[replayed])
            # The step's own slots of physical positions 0 .. physical_len - 1 (the prompt starts at 0).
            slots.append(slot_mapping[item.start : item.start + item.physical_len])
        attn.impl.do_kv_cache_update(
            attn, torch.cat(new_keys), torch.cat(new_values), kv_cache, torch.cat(slots)
        )

    def _select(
        self,
        view: AttentionView,
        captured: _LayerInput,
        keys: torch.Tensor,
        values: torch.Tensor,
        item: PromptCompaction,
    ) -> torch.Tensor:
        """Kept prompt token indices ``(kv_heads, kept)`` of one request in one layer."""
        prompt = slice(item.start, item.start + item.prompt_len)
        positions = captured.positions
        positions = positions[:, prompt][:, None] if positions.dim() == 2 else positions[prompt][None]
        state = ScoringState(adapter=self.adapter, key_mask=None, positions=positions)
        with self.press.scoring(state):
            scores = self.press.masked_scores(
                view,
                captured.hidden_states[prompt][None],
                keys[prompt].transpose(0, 1)[None],
                values[prompt].transpose(0, 1)[None],
                None,
                {},
            )
        indices, _ = select_kept_indices(scores, item.kept)
        return indices[0]
