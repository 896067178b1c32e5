"""Chunked prefill: what a press keeps of each prompt chunk, so that it scores the whole prompt at the end.

A prompt may reach the model in several forwards over one cache (``generate(prefill_chunk_size=...)``,
a loop of forwards after :meth:`~mmshiftkv.presses.base.BudgetedPress.expect_prompt`, a serving
engine's scheduled chunks). No press needs every layer's whole attention input at once. Per KV layer
a :class:`ChunkedPrefill` keeps

* the last :attr:`~mmshiftkv.presses.base.BudgetedPress.prefill_rows` rows of the attention input
  (SnapKV's window, the last query; at least :data:`~mmshiftkv.models.adapter.ROTATION_CHECK_ROWS`);
* what :meth:`~mmshiftkv.presses.base.BudgetedPress.accumulate_chunk` folds in chunk by chunk
  (ShiftKV's and ExpectedAttention's running :class:`~mmshiftkv.presses.moments.Moments`, LOOK-M's
  and VL-Cache's attention sums);
* under a whole-model allocator (MEDA, VL-Cache), its statistic's sums over the queries
  (:func:`~mmshiftkv.presses.deferred.accumulate_layer_sums`);

and for the prompt its padding mask, positions, image/video token mask and the visibility rows of the
model's own mask. Once
the last chunk is in, :meth:`ChunkedPrefill.prompt_state` is the :class:`ScoringState` of the whole
prompt and :meth:`ChunkedPrefill.attention_input` the ``hidden_states`` the press's ``score`` reads;
keys and values are those in the cache. Nothing here depends on transformers: a serving engine calls
:meth:`~ChunkedPrefill.add_chunk` once per scheduled chunk of a request, :meth:`~ChunkedPrefill.add_layer`
per layer, and scores each layer from the two accessors after the request's last chunk.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmshiftkv.cache.masks import VISIBILITY_ROWS
from mmshiftkv.models.adapter import ROTATION_CHECK_ROWS, ModelAdapter
from mmshiftkv.presses.deferred import accumulate_layer_sums
from mmshiftkv.presses.errors import PressUsageError
from mmshiftkv.presses.state import ScoringState

if TYPE_CHECKING:
    from mmshiftkv.presses.base import BudgetedPress


class TrailingRows:
    """The last ``keep`` rows (all when None) of one layer's attention input, ``(batch, rows, hidden)``."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self._parts: list[torch.Tensor] = []
        self._rows = 0

    def add(self, rows: torch.Tensor) -> None:
        if self.keep is not None and rows.shape[1] > self.keep:
            # A copy: a view would keep the whole chunk's activation alive.
            rows = rows[:, -self.keep :].clone()
        self._parts.append(rows)
        self._rows += rows.shape[1]
        while self.keep is not None and self._rows - self._parts[0].shape[1] >= self.keep:
            self._rows -= self._parts.pop(0).shape[1]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._parts)

    def tensor(self) -> torch.Tensor:
        rows = torch.cat(self._parts, dim=1)
        return rows if self.keep is None else rows[:, -self.keep :]


class ChunkedPrefill:
    """One prompt of ``prompt_length`` tokens per row (padding included) arriving in chunks.

    Parameters
    ----------
    press : BudgetedPress
        The press that will score the prompt (its ``prefill_rows`` and ``accumulate_chunk``).
    adapter : ModelAdapter
        The model's adapter (or any object with the same methods, e.g. the vLLM adapter).
    prompt_length : int
        Tokens per row of the whole prompt.

    Memory, per request and KV layer: the fewest whole chunks of attention-input rows that hold the
    last ``max(prefill_rows, 8)`` (at most ``max(prefill_rows, 8) + chunk - 1`` rows x ``hidden``),
    and the press's statistics (ShiftKV: 3 float64 per sample, or 3 x ``hidden`` per-feature;
    ExpectedAttention: ``heads x head_dim x (head_dim + 1)`` float64, twice: sinks and the rest); per
    request: the prompt's positions, padding mask and image/video token mask (``O(prompt_length)``
    integers: 8 bytes per token and M-RoPE axis, 1 and 1).
    """

    def __init__(self, press: BudgetedPress, adapter: ModelAdapter, prompt_length: int) -> None:
        self.press = press
        self.adapter = adapter
        self.prompt_length = prompt_length
        #: Tokens per row received so far.
        self.length = 0
        #: The cache the chunks go to (set by whoever routes the forwards; identity is checked there).
        self.cache: Any = None
        rows = press.prefill_rows
        allocator = press.allocator
        #: Whether a whole-model allocator gathers its statistic chunk by chunk too.
        self._allocating = allocator is not None and allocator.needs_all_layers
        if rows is not None and self._allocating:
            rows = max(rows, allocator.prefill_rows)
        self._keep = None if rows is None else max(rows, ROTATION_CHECK_ROWS, 1)
        self._rows: dict[int, TrailingRows] = {}
        self._statistics: dict[int, Any] = {}
        self._allocator_statistics: dict[int, Any] = {}
        self._positions: list[torch.Tensor] = []
        self._real: list[torch.Tensor | None] = []
        self._media: list[torch.Tensor | None] = []
        self._visibility: list[tuple[int, torch.Tensor | None]] = []
        self._chunk: ScoringState | None = None
        self._chunk_real: torch.Tensor | None = None
        self._block_closes: torch.Tensor | None = None
        self._prompt_state: ScoringState | None = None

    @property
    def complete(self) -> bool:
        return self.length == self.prompt_length

    @property
    def nbytes(self) -> int:
        """Bytes held for the prompt so far: trailing rows, statistics (the press's and a whole-model
        allocator's), positions, padding, image-token mask, visibility."""
        visibility = [rows for _, rows in self._visibility]
        statistics = [self._statistics, self._allocator_statistics]
        held = [statistics, self._positions, self._real, self._media, visibility]
        return sum(rows.nbytes for rows in self._rows.values()) + _tensor_bytes(held)

    def add_chunk(
        self,
        n_tokens: int,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        visibility: torch.Tensor | None = None,
        block_edges: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
    ) -> None:
        """Register the next chunk (before its layers are added).

        Parameters
        ----------
        n_tokens : int
            Tokens per row in the chunk.
        positions : torch.Tensor
            The chunk's positions, ``(batch, n_tokens)`` or ``(3, batch, n_tokens)``.
        key_mask : torch.Tensor, optional
            ``(batch, keys)`` bool, True for real tokens, over the keys so far (its last ``n_tokens``
            columns are the chunk's); None: no padding.
        visibility : torch.Tensor, optional
            ``(batch, rows, keys)`` bool visibility of the chunk's last queries where the model's mask is
            not causal (:func:`~mmshiftkv.cache.masks.last_rows`).
        block_edges : tuple of torch.Tensor, optional
            :func:`~mmshiftkv.cache.masks.block_edges` of the chunk's mask.
        mask : torch.Tensor, optional
            The model's own 4-D mask of the chunk, ``(batch or 1, 1, n_tokens, keys)``
            (:func:`~mmshiftkv.cache.masks.full_mask`), for presses that read the attention of every
            chunk query (held for the chunk only); None: causal with ``key_mask`` padding.
        media_mask : torch.Tensor, optional
            ``(batch, n_tokens)`` bool, True at the chunk's image/video tokens
            (:meth:`~mmshiftkv.models.adapter.ModelAdapter.media_mask`); None where unknown.

        Raises
        ------
        PressUsageError
            If the chunk goes past the prompt, or it and the previous chunk split one bidirectional
            attention block (the model's prefill then differs from a one-forward prefill).
        """
        if self.length + n_tokens > self.prompt_length:
            raise PressUsageError(
                f"{type(self.press).__name__}: a prefill chunk of {n_tokens} tokens after {self.length} goes "
                f"past the {self.prompt_length}-token prompt"
            )
        if block_edges is not None:
            opens, closes = block_edges
            if self._block_closes is not None and bool((self._block_closes & opens).any()):
                raise PressUsageError(
                    f"{type(self.press).__name__}: the chunk boundary at token {self.length} splits a "
                    "bidirectional attention block of the model's mask (Gemma 3's image tokens): the "
                    "block's queries before the boundary cannot see its keys after it, so this prefill, and "
                    "any selection made from it, differs from a one-forward prefill. Prefill the prompt in "
                    "one forward, or choose chunk boundaries outside image blocks"
                )
            self._block_closes = closes
        else:
            self._block_closes = None
        real = None if key_mask is None else key_mask[:, -n_tokens:]
        self._chunk = ScoringState(
            adapter=self.adapter,
            key_mask=key_mask,
            positions=positions,
            visibility=visibility,
            image_mask=media_mask,
            mask=mask,
        )
        self._chunk_real = real
        self._positions.append(positions.clone())
        self._real.append(None if real is None else real.clone())
        self._media.append(None if media_mask is None else media_mask.to(torch.bool, copy=True))
        self._visibility.append((n_tokens, visibility))
        self._trim_visibility()
        self.length += n_tokens
        self._prompt_state = None

    def add_layer(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor | None) -> None:
        """Fold the current chunk of KV layer ``module`` in.

        Parameters
        ----------
        hidden_states : torch.Tensor
            The layer's attention input for the chunk, ``(batch, n_tokens, hidden)``.
        keys : torch.Tensor or None
            The layer's keys so far (this chunk's included), ``(batch, kv_heads, keys, head_dim)``, for
            presses whose statistics read them; None where the caller cannot provide them.
        """
        layer = module.layer_idx
        self._rows.setdefault(layer, TrailingRows(self._keep)).add(hidden_states)
        if getattr(module, "sliding_window", None):
            return  # not scored (see BudgetedPress.compress_layer)
        real = self._chunk_real
        if real is None:
            real = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        with self.press.scoring(self._chunk):
            self._statistics[layer] = self.press.accumulate_chunk(
                module, hidden_states, real, keys, self._statistics.get(layer)
            )
            if self._allocating:
                self._allocator_statistics[layer] = accumulate_layer_sums(
                    self.press, module, hidden_states, real, keys, self._allocator_statistics.get(layer)
                )

    def attention_input(self, module: nn.Module) -> torch.Tensor:
        """What :meth:`~BudgetedPress.score` reads as ``hidden_states``: the kept trailing rows."""
        return self._rows[module.layer_idx].tensor()

    def prompt_state(self) -> ScoringState:
        """The :class:`ScoringState` of the whole prompt (valid once :attr:`complete`).

        Raises
        ------
        PressUsageError
            If the chunks' positions contradict one another (see :func:`check_chunk_positions`).
        """
        if not self.complete:
            raise RuntimeError(f"the prompt is not complete: {self.length} of {self.prompt_length} tokens")
        if self._prompt_state is None:
            positions = torch.cat(self._positions, dim=-1)
            key_mask = None
            if any(real is not None for real in self._real):
                key_mask = torch.cat(
                    [
                        torch.ones(p.shape[-2:], dtype=torch.bool, device=p.device) if real is None else real
                        for p, real in zip(self._positions, self._real)
                    ],
                    dim=-1,
                )
                key_mask = None if bool(key_mask.all()) else key_mask
            check_chunk_positions(positions, key_mask, type(self.press).__name__)
            media = None if any(m is None for m in self._media) else torch.cat(self._media, dim=-1)
            self._prompt_state = ScoringState(
                adapter=self.adapter,
                key_mask=key_mask,
                positions=positions,
                visibility=self._prompt_visibility(positions),
                image_mask=media,
                prompt_length=self.length,
                # The live dict: at the last chunk, layers after the first fold their share in after
                # this state is built (at the first layer).
                chunk_statistics=self._statistics,
                allocator_statistics=self._allocator_statistics if self._allocating else None,
            )
        return self._prompt_state

    def _trim_visibility(self) -> None:
        rows = sum(n for n, _ in self._visibility)
        while rows - self._visibility[0][0] >= VISIBILITY_ROWS:
            rows -= self._visibility.pop(0)[0]

    def _prompt_visibility(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The last queries' visibility over the whole prompt, from the chunks' own masks (None: causal)."""
        if all(rows is None for _, rows in self._visibility):
            return None
        length = self.length
        n_rows = min(VISIBILITY_ROWS, length)
        device = positions.device
        query = torch.arange(length - n_rows, length, device=device)
        seen = torch.arange(length, device=device)[None, :] <= query[:, None]
        seen = seen[None].expand(positions.shape[-2], -1, -1).clone()
        end = length
        for n_tokens, rows in reversed(self._visibility):
            if rows is not None:
                # The chunk's rows see keys up to its own end; later chunks' keys stay hidden from them.
                first = end - rows.shape[1]
                take = slice(max(first, length - n_rows) - first, rows.shape[1])
                target = slice(max(first, length - n_rows) - (length - n_rows), end - (length - n_rows))
                seen[:, target, : rows.shape[2]] = rows[:, take].to(device)
                seen[:, target, rows.shape[2] :] = False
            end -= n_tokens
        beyond_causal = torch.arange(length, device=device)[None, :] > query[:, None]
        return seen if bool((seen & beyond_causal).any()) else None


def check_chunk_positions(positions: torch.Tensor, key_mask: torch.Tensor | None, press_name: str) -> None:
    """Refuse chunk positions that put an earlier real token at or after the prompt's last one.

    The last prompt token (text, with the same position on every M-RoPE axis) comes after every other
    token in any RoPE model; a chunked prefill whose chunks reached the rotary embedding with later
    positions was given wrong ones (transformers 5.2's ``generate(prefill_chunk_size=...)`` gives every
    chunk the positions of the prompt's last tokens; its output then differs from a one-forward
    prefill, with or without a press).
    """
    if positions.shape[-1] < 2:
        return
    axes = positions if positions.dim() == 3 else positions[None]
    last = axes[..., -1]  # (axes, batch)
    text_like = (last == last[:1]).all(0)
    earlier = axes[..., :-1] >= last.amin(0)[None, :, None]
    if key_mask is not None:
        earlier = earlier & key_mask[None, :, :-1]
    wrong = earlier.any(0).any(-1) & text_like
    if bool(wrong.any()):
        raise PressUsageError(
            f"{press_name}: the prefill chunks reached the rotary embedding with positions at or after the "
            f"last prompt token's ({int(last[0, int(wrong.nonzero()[0])])}), so the chunked prefill ran at "
            "wrong positions (transformers 5.2's generate(prefill_chunk_size=...) gives every chunk the "
            "positions of the prompt's last tokens; its output differs from a one-forward prefill even "
            "without a press). "
            "Upgrade transformers, pass each chunk's position_ids, or prefill in one forward"
        )


def _tensor_bytes(value: object) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or dataclasses, lists, tuples and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_tensor_bytes(getattr(value, field.name)) for field in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(map(_tensor_bytes, value.values()))
    if isinstance(value, list | tuple):
        return sum(map(_tensor_bytes, value))
    return 0
