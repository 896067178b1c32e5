"""VL-Cache's sparsity-aware layer budgets (Tu et al., ICLR 2025): denser layers keep more."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mmshiftkv.allocators.layer_budgets import (
    LayerBudgetAllocator,
    QueryBlock,
    check_fraction,
    masked_softmax,
    post_vision_queries,
    post_vision_so_far,
    require_image_mask,
)
from mmshiftkv.validation import check_bool, check_int


@dataclass
class VLCacheAllocator(LayerBudgetAllocator):
    """Layer budgets in proportion to each layer's post-vision attention density (VL-Cache, Sec. 4.1).

    No code was released with the paper, and only its abstract, the caption of its Fig. 4 and
    third-party summaries could be read here. What they say: the post-vision attention (queries =
    the tokens after the last visual token) measures each layer's sparsity at prefill, per prompt,
    and the limited budget is distributed across layers by it. The definitions below are our
    reading of the paper's Sec. 3-4 (from memory, not re-read here); the one public
    re-implementation (SalesforceAIResearch/GUI-KV, ``VLCacheCluster`` and its budget code) agrees
    with them except for the threshold. For a sample and layer:

    * ``gamma_l`` = fraction of the post-vision attention entries ``A[h, i, j]`` (query heads ``h``,
      post-vision queries ``i``, the keys ``j`` query ``i`` sees: causal, padding excluded) below the
      threshold: ``A < threshold * max_j A[h, i, :]`` (``relative``: the paper's threshold filter,
      relative to the row maximum) or ``A <= threshold`` (absolute, as GUI-KV counts);
    * ``B_l = (1 - gamma_l) / sum_k (1 - gamma_k) * L * B`` tokens per KV head (GUI-KV's
      ``betas``).

    Ours: the bounds ``[1, n]`` with redistribution and the largest-remainder rounding of
    :mod:`mmshiftkv.allocators.layer_budgets`, so the layers sum to ``L * B`` exactly (GUI-KV
    truncates to int and clamps the shares to ``[0.001, 1]``); all layers with zero density share
    evenly; a budget ``B`` in tokens per KV head (the paper's is a fraction of the prompt, ``B = alpha
    n``). A prompt without an image (or ending in one) has no post-vision tokens: its last
    ``fallback_window`` real tokens stand in.

    Parameters
    ----------
    threshold : float, default=0.01
        Attention below ``threshold`` (times the row maximum if ``relative``) counts as sparse; in
        ``(0, 1]``.
    relative : bool, default=True
        Threshold relative to each query's largest attention (paper) or absolute (GUI-KV).
    fallback_window : int, default=32
        Queries standing in for the post-vision tokens of a prompt that has none.
    """

    threshold: float = 0.01
    relative: bool = True
    fallback_window: int = 32

    def __post_init__(self) -> None:
        check_fraction(self.threshold, "threshold", low_open=True)
        check_bool(self.relative, "relative")
        check_int(self.fallback_window, "fallback_window", minimum=1)

    def statistic_queries(self, key_mask: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        image_mask = require_image_mask(image_mask, key_mask, type(self).__name__)
        return post_vision_queries(key_mask, image_mask, self.fallback_window)

    @property
    def prefill_rows(self) -> int:
        return self.fallback_window

    def chunk_queries(
        self, real: torch.Tensor, image_mask: torch.Tensor | None, seen_image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_mask = require_image_mask(image_mask, real, type(self).__name__)
        return post_vision_so_far(real, image_mask, seen_image)

    def layer_statistic(
        self, blocks: Iterable[QueryBlock], key_mask: torch.Tensor, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Sparsity ``gamma_l`` per sample, ``(batch,)`` float64 in ``[0, 1]``."""
        sparse, entries = self.layer_sums(blocks, key_mask)
        return sparse / entries.clamp(min=1)

    def layer_sums(
        self, blocks: Iterable[QueryBlock], key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention entries and all entries of the blocks' queries, ``(batch,)`` float64 each."""
        sparse = torch.zeros(key_mask.shape[0], dtype=torch.float64)
        entries = torch.zeros(key_mask.shape[0], dtype=torch.float64)
        for block in blocks:
            seen = block.visible & block.queries[:, :, None]  # (batch, rows, seq)
            probs = masked_softmax(block.logits, seen[:, None])
            if self.relative:
                cut = self.threshold * probs.amax(-1, keepdim=True)
                below = probs < cut
            else:
                below = probs <= self.threshold
            sparse += (below & seen[:, None]).sum((1, 2, 3)).double().cpu()
            entries += (seen.sum((1, 2)) * probs.shape[1]).double().cpu()
        return sparse, entries

    def layer_weights(self, statistics: torch.Tensor) -> torch.Tensor:
        return (1 - statistics.double()).clamp(min=0)
