"""What a press knows about the prefill it scores, and what it reports having kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
    attention_mask : object
        The mask the decoder received (2-D padding mask, 4-D mask, a dict of them per layer type, or
        None): :func:`mmshiftkv.cache.masks.query_rows` reads the visibility of any prompt query off it.
    image_mask : torch.Tensor or None
        ``(batch, seq_len)`` bool, True for the prompt's image and video placeholder tokens (from its
        token ids and the config's image/video token ids, :mod:`mmshiftkv.models.modality`); None
        when the forward got no token ids (``inputs_embeds``).
    """

    adapter: ModelAdapter
    key_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    visibility: torch.Tensor | None = None
    attention_mask: object = None
    image_mask: torch.Tensor | None = None

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
    """

    prompt_tokens: list[int] = field(default_factory=list)
    kept: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    indices: list[torch.Tensor | None] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compressed(self) -> bool:
        return self.bytes_after < self.bytes_before
