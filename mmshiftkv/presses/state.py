"""What a press knows about the prefill it scores, and what it reports having kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmshiftkv.models.adapter import ModelAdapter


@dataclass
class ScoringState:
    """What a press's :meth:`~BudgetedPress.score` may use besides its arguments.

    Inside ``with press(model):`` the hooks fill it for every prefill. Code that calls ``score``
    directly (a serving engine, kvpress's wrappers, a benchmark) binds one with
    :meth:`BudgetedPress.scoring`.

    Attributes
    ----------
    adapter : ModelAdapter
        The model's adapter (or any object with the same methods).
    key_mask : torch.Tensor or None
        ``(batch, seq_len)`` bool, True for real tokens; None when the prompt has no padding.
    positions : torch.Tensor or None
        The positions the rotary embedding received: ``(batch, seq_len)``, or
        ``(3, batch, seq_len)`` for M-RoPE models.
    visibility : torch.Tensor or None
        ``(batch, rows, seq_len)`` bool: which keys each of the last ``rows`` prompt queries may
        attend to, read off the model's own 4-D mask (image tokens attend bidirectionally in
        Gemma 3); None when the model gave a plain causal/padding mask.
    image_mask : torch.Tensor or None
        ``(batch, seq_len)`` bool, True at the prompt's image and video tokens (the model config's
        image/video token ids in ``input_ids``); all False for a text-only model; None when the
        prompt's token ids are unknown (``inputs_embeds`` alone).
    mask : torch.Tensor or None
        The model's own 4-D mask ``(batch or 1, 1, seq_len, seq_len)`` (boolean, or additive with 0 =
        visible) when it gave one, for presses and allocators that read the attention of any prompt
        query (:func:`~mmshiftkv.presses.attention.query_blocks`); None means causal attention with
        ``key_mask`` padding. Held during the prefill forward only.
    prompt_length : int or None
        Tokens per row of the whole prompt when the ``hidden_states`` given to ``score`` hold only its
        last rows (a chunked prefill, :mod:`mmshiftkv.presses.chunked`); None: they hold the whole prompt.
    chunk_statistics : dict or None
        Per KV layer (``layer_idx``), what the press's ``accumulate_chunk`` gathered over the chunks of
        a chunked prefill; None for a prefill in one forward.
    allocator_statistics : dict or None
        Per KV layer, the whole-model allocator's sums over the chunks of a chunked prefill
        (:func:`~mmshiftkv.presses.deferred.accumulate_layer_sums`); None otherwise.
    """

    adapter: ModelAdapter
    key_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    visibility: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    prompt_length: int | None = None
    chunk_statistics: dict[int, Any] | None = None
    allocator_statistics: dict[int, Any] | None = None

    def accumulated(self, module: nn.Module) -> Any:
        """What ``accumulate_chunk`` gathered for ``module``'s layer over a chunked prefill, else None."""
        return None if self.chunk_statistics is None else self.chunk_statistics.get(module.layer_idx)

    def real_tokens(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """``(batch, seq_len)`` bool, True at real prompt tokens: ``key_mask``, all True without one."""
        if self.key_mask is None:
            return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        return self.key_mask

    def n_tokens(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Real prompt tokens per sample, ``(batch,)`` int64."""
        if self.key_mask is None:
            return torch.full((batch,), seq_len, dtype=torch.long, device=device)
        return self.key_mask.sum(-1).long()


@dataclass
class CompressionStats:
    """What the last prefill under a press kept.

    Attributes
    ----------
    prompt_tokens : list[int]
        Real prompt tokens per sample.
    kept : torch.Tensor
        ``(kv_layers, batch, kv_heads)`` prompt tokens kept per head (layers that hold a KV cache).
    indices : list[torch.Tensor or None]
        Per KV layer, the kept token indices ``(batch, kv_heads, max_kept)`` (row ``(b, h)`` valid up
        to ``kept[layer, b, h]``, ascending), or None for a layer left uncompressed.
    bytes_before, bytes_after : int
        Bytes of the prompt KV cache (keys + values, all layers, the whole batch with its padding)
        before and after compression.
    layer_statistics : torch.Tensor or None
        ``(kv_layers, batch)`` float64, the per-layer statistic a whole-model allocator shared the
        budget by (MEDA's entropy, VL-Cache's sparsity); NaN for layers it did not allocate
        (sliding-window layers); None under other allocators.
    """

    prompt_tokens: list[int] = field(default_factory=list)
    kept: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    indices: list[torch.Tensor | None] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    layer_statistics: torch.Tensor | None = None

    @property
    def compressed(self) -> bool:
        return self.bytes_after < self.bytes_before
