"""MEDA's layer budgets (Wan et al., NAACL 2025): more cache where a layer's attention entropy is higher."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from mmshiftkv.allocators.layer_budgets import (
    LayerBudgetAllocator,
    QueryBlock,
    check_fraction,
    masked_softmax,
    require_image_mask,
    row_entropy,
)

ENTROPIES = ("cross_modal", "prompt")


@dataclass
class MEDAAllocator(LayerBudgetAllocator):
    """Layer budgets from the softmax over layers of each layer's attention entropy (MEDA, Sec. 3).

    For a sample of ``n > B`` real tokens and the ``L`` layers that share the budget, layer ``l``
    gets ``w_l * L * B`` tokens per KV head with ``w = softmax_l(E_l)`` (MEDA's ``alpha_l = w_l * L *
    rho``, ``rho = B / n``): flatter attention, a larger cache. Bounds, rounding and the exact total
    ``L * B`` are those of :mod:`mmshiftkv.allocators.layer_budgets` (ours; the released code
    truncates ``n * alpha_l`` to an int and so misses the total).

    ``E_l`` per sample, in float32 attention and float64 sums, averaged over the query heads:

    * ``"cross_modal"`` (default; the paper's Eq. ``E_CM = -(E_TV + E_VT)``): with ``T`` the real text
      tokens and ``V`` the image/video tokens, ``E_TV`` is the mean over text queries of the entropy
      of ``softmax(q k^T * scaling)`` over the visual keys only, ``E_VT`` the mean over visual queries
      over the text keys only. As in the paper's formula (and the released, never called
      ``compute_crossmodal_entropy``) there is no causal mask: a text query before the image sees
      the whole image. Padding is excluded. A sample without image tokens (or without text) has no
      cross-modal attention: its entropy is the ``"prompt"`` one (our decision).
    * ``"prompt"`` (the released code, ``compute_multimodal_entropy``, which is what its runs use): the
      mean over all real prompt queries of the row entropy of the layer's own attention
      (causal, or the model's own mask), the reference's ``sum(-A log A) / T``.

    Where the released code differs beyond the entropy (see :meth:`reference`): its ratios are clamped
    to ``[0.01, 1]`` of the prompt, it allocates at the first decode step (the first generated
    token's attention included in the scores), its clamp bound ``1e-12`` turns the fp16 entropy
    into NaN (ours is float32 with ``0 log 0 = 0``), and it reads the entropy of batch element 0 for
    the whole batch (ours: per sample). Which tokens each layer keeps and MEDA's KV merging are the
    press's business (LOOK-M's text-prior press with its average merge).

    Parameters
    ----------
    entropy : {"cross_modal", "prompt"}, default="cross_modal"
        Which attention entropy weighs the layers (see above).
    min_ratio : float, default=0.0
        Every layer keeps at least ``ceil(min_ratio * n)`` tokens (but never more than ``B``, so the
        total stays ``L * B``); the released code's lower clamp is 0.01. In ``[0, 1]``.
    """

    entropy: Literal["cross_modal", "prompt"] = "cross_modal"
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.entropy not in ENTROPIES:
            raise ValueError(f"entropy must be one of {', '.join(ENTROPIES)}, got {self.entropy!r}")
        check_fraction(self.min_ratio, "min_ratio")

    @classmethod
    def reference(cls, **overrides) -> MEDAAllocator:
        """The released code's allocation (AIoT-MLSys-Lab/MEDA @ 0e1a53b): whole-prompt attention
        entropy and the lower clamp of 1% of the prompt per layer; any field can be overridden."""
        return cls(**{"entropy": "prompt", "min_ratio": 0.01, **overrides})

    def lowest_budget(self, budget: int, n: int) -> int:
        return max(1, math.ceil(self.min_ratio * n - 1e-9))

    def layer_weights(self, statistics: torch.Tensor) -> torch.Tensor:
        return torch.softmax(statistics.double(), dim=0)

    def layer_statistic(
        self, blocks: Iterable[QueryBlock], key_mask: torch.Tensor, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.entropy == "cross_modal":
            image_mask = require_image_mask(image_mask, key_mask, "MEDAAllocator(entropy='cross_modal')")
            return self._cross_modal_entropy(blocks, key_mask, image_mask)
        total, queries = self.layer_sums(blocks, key_mask)
        return total / queries.clamp(min=1)

    def chunked_prefill_refusal(self) -> str | None:
        if self.entropy == "cross_modal":
            return (
                "allocates from the cross-modal attention entropy, where a text query sees every image key "
                "and an image query every text key, also those after it: a chunk's queries would need keys "
                "of later chunks. Use MEDAAllocator(entropy='prompt') (the released code's entropy)"
            )
        return None

    def layer_sums(
        self, blocks: Iterable[QueryBlock], key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt entropy's sum over the blocks' queries and their number, ``(batch,)`` float64 each."""
        total = torch.zeros(key_mask.shape[0], dtype=torch.float64)
        queries = torch.zeros(key_mask.shape[0], dtype=torch.float64)
        for block in blocks:
            total += _entropy_sum(block).cpu()
            queries += block.queries.sum(-1).double().cpu()
        return total, queries

    def _cross_modal_entropy(
        self, blocks: Iterable[QueryBlock], key_mask: torch.Tensor, image_mask: torch.Tensor
    ) -> torch.Tensor:
        visual = image_mask & key_mask
        text = key_mask & ~image_mask
        n_text, n_visual = text.sum(-1).cpu(), visual.sum(-1).cpu()
        cross_modal = (n_text > 0) & (n_visual > 0)
        batch = key_mask.shape[0]
        sums = {kind: torch.zeros(batch, dtype=torch.float64) for kind in ("tv", "vt", "prompt")}
        for block in blocks:
            # One softmax per row: a text query over the visual keys, a visual query over the text keys.
            query_is_text = text[:, block.query_index]  # (batch, rows)
            other = torch.where(query_is_text[:, :, None], visual[:, None, :], text[:, None, :])
            per_row = row_entropy(masked_softmax(block.logits, other[:, None])).mean(1)  # (batch, rows)
            sums["tv"] += (per_row * (block.queries & query_is_text)).sum(-1).double().cpu()
            sums["vt"] += (per_row * (block.queries & visual[:, block.query_index])).sum(-1).double().cpu()
            if not bool(cross_modal.all()):
                sums["prompt"] += _entropy_sum(block).cpu()
        cross = sums["tv"] / n_text.clamp(min=1) + sums["vt"] / n_visual.clamp(min=1)
        prompt = sums["prompt"] / key_mask.sum(-1).cpu().clamp(min=1)
        return torch.where(cross_modal, cross, prompt)


def _entropy_sum(block: QueryBlock) -> torch.Tensor:
    """Sum over the block's chosen rows of the mean over query heads of the model-attention row entropy."""
    probs = masked_softmax(block.logits, block.visible[:, None])
    return (row_entropy(probs).mean(1) * block.queries).sum(-1).double()
