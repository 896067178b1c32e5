"""The allocator interface: how many prompt tokens each (layer, KV head) may keep.

A press decides *which* tokens a KV head keeps; an allocator decides *how many*. The press binds
its allocator to the model's shape once per ``with press(model):`` and then asks, layer by layer
at the end of prefill, for a ``(batch, kv_heads)`` table of token counts.

Rules shared by every allocator (applied here, once, after the allocator's own formula):

* ``budget`` is the user's per-KV-head budget B: prompt tokens per KV head after compression,
  the last prompt token included. Uniform keeps exactly B everywhere; the other allocators
  move tokens between layers/heads around that mean.
* A prompt no longer than the budget (``n <= B``) is left uncompressed: every head keeps ``n``.
  (The reference repos switch compression off only when ``n < B``; at ``n == B`` exactly their
  rounding could drop a token or two, which we do not do.)
* Every count is clipped to ``[1, n]``: a head keeps at least the last prompt token and never
  more tokens than the sample has. A count equal to ``n`` means "not compressed".
* Samples are independent: row ``b`` depends only on ``n_tokens[b]`` (and ``scores[b]``), so a
  sample gets the same counts alone or inside any batch.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch


def check_window(window: object) -> None:
    """Validate the always-kept recent window of the windowed allocators."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be an int >= 0 (recent tokens always kept), got {window!r}")


def budget_after_window(budget: int, window: int) -> int:
    """B' = B - W, the part of the budget the allocator distributes; must be positive."""
    if budget <= window:
        raise ValueError(
            f"budget ({budget}) must be larger than window ({window}): the allocator distributes "
            f"budget - window tokens per head. Use a larger budget or a smaller window."
        )
    return budget - window


@dataclass
class Allocator(ABC):
    """Base class: per-(sample, KV head) token budgets for one layer at the end of prefill.

    Subclasses implement :meth:`_allocate_sample` for one sample whose prompt is longer than the
    budget; this class validates the inputs and applies the shared rules of the module docstring.

    Attributes
    ----------
    needs_scores : bool
        Class flag: True when :meth:`allocate` needs the press's token scores (AdaKV).
    needs_all_layers : bool
        Class flag: True when a layer's budget depends on statistics of every layer (MEDA, VL-Cache):
        the press then scores all layers first and allocates and compresses them once the prefill
        forward is done (:class:`~mmshiftkv.allocators.layer_budgets.LayerBudgetAllocator`).
    n_layers, n_heads, n_kv_heads : int
        The bound model's decoder layers, query heads and KV heads (0 before :meth:`bind`).
    """

    needs_scores: ClassVar[bool] = False
    needs_all_layers: ClassVar[bool] = False
    n_layers: int = field(default=0, init=False, repr=False, compare=False)
    n_heads: int = field(default=0, init=False, repr=False, compare=False)
    n_kv_heads: int = field(default=0, init=False, repr=False, compare=False)

    def bind(self, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
        """Attach the allocator to a model shape; called once per ``with press(model):``.

        Parameters
        ----------
        n_layers : int
            Decoder layers of the language model.
        n_heads : int
            Query heads per layer.
        n_kv_heads : int
            KV heads per layer; must divide ``n_heads`` (GQA groups of consecutive query heads).

        Raises
        ------
        ValueError
            If the shape is invalid or does not fit the allocator (e.g. SparseMM head scores made
            for another model).
        """
        for name, value in (("n_layers", n_layers), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_layers, self.n_heads, self.n_kv_heads = int(n_layers), int(n_heads), int(n_kv_heads)

    def allocate(
        self,
        budget: int,
        layer_idx: int,
        n_tokens: torch.Tensor,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens to keep per (sample, KV head) in one layer.

        Parameters
        ----------
        budget : int
            Per-KV-head budget B (tokens after compression, last prompt token included), >= 1.
        layer_idx : int
            Decoder layer, in ``[0, n_layers)``.
        n_tokens : torch.Tensor
            ``(batch,)`` int64, real prompt tokens per sample. Padding is on the left: the real
            tokens of sample ``b`` are the last ``n_tokens[b]`` positions.
        scores : torch.Tensor, optional
            ``(batch, kv_heads, seq_len)`` float, the press's scores (higher = keep), padding at
            ``-inf``. Required when :attr:`needs_scores`, ignored otherwise.

        Returns
        -------
        torch.Tensor
            ``(batch, kv_heads)`` int64 on ``n_tokens``' device, each entry in ``[1, n_tokens[b]]``;
            ``n_tokens[b]`` means the head is not compressed.
        """
        if self.n_layers == 0:
            raise RuntimeError(
                f"{type(self).__name__}.bind(n_layers, n_heads, n_kv_heads) must be called first"
            )
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
            raise ValueError(f"budget must be an int >= 1 (tokens per KV head), got {budget!r}")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, numbers.Integral):
            raise ValueError(f"layer_idx must be an int, got {layer_idx!r}")
        if not 0 <= layer_idx < self.n_layers:
            raise ValueError(f"layer_idx {layer_idx} is out of range for a {self.n_layers}-layer model")
        n_tokens = torch.as_tensor(n_tokens)
        if n_tokens.dim() != 1 or n_tokens.dtype.is_floating_point or n_tokens.dtype == torch.bool:
            raise ValueError(
                f"n_tokens must be a (batch,) integer tensor, got {n_tokens.dtype} {tuple(n_tokens.shape)}"
            )
        lengths = n_tokens.tolist()
        if min(lengths, default=1) < 1:
            raise ValueError(f"every sample needs at least one real prompt token, got n_tokens={lengths}")
        if self.needs_scores:
            self._check_scores(scores, lengths)
        budget, layer_idx = int(budget), int(layer_idx)

        kept = torch.empty(len(lengths), self.n_kv_heads, dtype=torch.long)
        for b, n in enumerate(lengths):
            if n <= budget:
                kept[b] = n
            else:
                row = self._allocate_sample(budget, layer_idx, n, scores[b] if self.needs_scores else None)
                kept[b] = row.to("cpu", torch.long).clamp(min=1, max=n)
        return kept.to(n_tokens.device)

    def _check_scores(self, scores: torch.Tensor | None, lengths: list[int]) -> None:
        if scores is None:
            raise ValueError(
                f"{type(self).__name__} needs the press's scores: pass scores=(batch, kv_heads, seq_len)"
            )
        if scores.dim() != 3 or scores.shape[0] != len(lengths) or scores.shape[1] != self.n_kv_heads:
            raise ValueError(
                f"scores must have shape (batch={len(lengths)}, kv_heads={self.n_kv_heads}, seq_len), "
                f"got {tuple(scores.shape)}"
            )
        if max(lengths, default=0) > scores.shape[2]:
            raise ValueError(f"n_tokens {lengths} exceed the scores' seq_len {scores.shape[2]}")

    @abstractmethod
    def _allocate_sample(
        self, budget: int, layer_idx: int, n: int, scores: torch.Tensor | None
    ) -> torch.Tensor:
        """Counts for one sample with ``n > budget`` real tokens, before clipping to ``[1, n]``.

        Parameters
        ----------
        budget, layer_idx : int
            As in :meth:`allocate` (validated).
        n : int
            Real prompt tokens of the sample, ``n > budget``.
        scores : torch.Tensor or None
            ``(kv_heads, seq_len)`` scores of the sample when :attr:`needs_scores`, else None.

        Returns
        -------
        torch.Tensor
            ``(kv_heads,)`` integer counts.
        """
