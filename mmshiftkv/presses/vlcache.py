"""VL-Cache's modality-aware token scoring: the attention of the post-vision queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mmshiftkv.allocators.layer_budgets import (
    masked_softmax,
    post_vision_queries,
    post_vision_so_far,
    require_image_mask,
)
from mmshiftkv.presses.attention import mean_over_query_groups, query_blocks
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.errors import PressUsageError
from mmshiftkv.presses.state import ScoringState
from mmshiftkv.validation import check_int, check_pooling_kernel


@dataclass(kw_only=True)
class VLCachePress(BudgetedPress):
    """VL-Cache (Tu et al., ICLR 2025, Sec. 4.2): tokens ranked by the post-vision attention.

    No code was released with the paper (and only its abstract, Fig. 4 caption and third-party
    summaries were readable here). From the paper: *post-vision attention* selects the critical
    visual and language tokens: the queries are the post-vision tokens (the language tokens after the
    last visual token: the question and the assistant prefix), a prompt token's importance the
    attention they give it, accumulated over them (the layers' budgets come from the same attention:
    :class:`~mmshiftkv.allocators.vlcache.VLCacheAllocator`, which the registry's ``"vlcache"`` adds
    by default). Our reading, the same as the public re-implementation in SalesforceAIResearch/GUI-KV
    (``VLCacheCluster``): the post-vision tokens themselves are always kept (they are the window;
    their own scores are cut short by causality), and the budget left goes to the best-scored
    earlier tokens, visual and textual alike.

    Per layer, sample and KV head, with ``P`` the post-vision queries of the sample
    (:func:`~mmshiftkv.allocators.layer_budgets.post_vision_queries`):

    * ``s(j) = mean_{i in P} A[i, j]`` with ``A`` the layer's softmax attention as the model computes
      it (rotated queries at the prompt positions, causal or the model's own mask, padding
      excluded), averaged over the query heads of the KV head (GQA); the mean orders tokens as the
      paper's sum does;
    * optional average pooling over neighbouring tokens (``kernel_size``; GUI-KV pools with 5 as
      SnapKV does, the paper does not mention it);
    * the post-vision tokens rank above every other token, the latest first, so that a budget smaller
      than ``|P|`` keeps the last ones.

    ``P`` is found from the image/video token ids (:attr:`ScoringState.image_mask`); a prompt without
    an image, or ending in one, uses its last ``fallback_window`` tokens instead (ours). The
    attention is computed in float32 blocks of queries (bounded memory) whatever the model dtype.

    Under a chunked prefill the last image token is known only once the prompt is in: each chunk's
    queries after the last image token so far add their attention over the keys so far to a running
    sum, which restarts at a chunk holding an image token (:meth:`accumulate_chunk`); a sample left
    without post-vision tokens at the end is scored from its last ``fallback_window`` rows, kept
    across chunks (:attr:`prefill_rows`).

    Parameters
    ----------
    fallback_window : int, default=32
        Queries standing in for the post-vision tokens of a prompt that has none.
    kernel_size : int, default=1
        Average-pooling kernel over the token axis (odd; 1 = none).
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    fallback_window: int = 32
    kernel_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.fallback_window, "fallback_window", minimum=1)
        check_pooling_kernel(self.kernel_size)

    @property
    def prefill_rows(self) -> int:
        return self.fallback_window  # the fallback queries of a prompt without post-vision tokens

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        state = self.state
        batch, kv_heads, seq_len, _ = keys.shape
        key_mask = state.real_tokens(batch, seq_len, keys.device)
        image_mask = require_image_mask(state.image_mask, key_mask, type(self).__name__)
        post_vision = post_vision_queries(key_mask, image_mask, self.fallback_window)
        # A chunked prefill gives the trailing rows only; their queries are the fallback ones.
        past = seq_len - hidden_states.shape[1]
        accumulated: PostVisionAttention | None = state.accumulated(module)
        if accumulated is None:
            received = _received(state, module, hidden_states, keys, post_vision[:, past:], past)
        else:
            # The chunks gathered the post-vision queries where they gathered as many (else none).
            summed = accumulated.count.to(keys.device) == post_vision.sum(-1)
            fallback = post_vision[:, past:] & ~summed[:, None]
            received = _received(state, module, hidden_states, keys, fallback, past)
            received = torch.where(summed[:, None, None], accumulated.received, received)
        received = received / post_vision.sum(-1).clamp(min=1)[:, None, None]
        if self.kernel_size > 1:
            received = F.avg_pool1d(received, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        # Post-vision tokens outrank every other (mean attention is <= 1), the latest first.
        order = post_vision.long().cumsum(-1) / post_vision.sum(-1, keepdim=True).clamp(min=1)
        kept_first = (2.0 + order)[:, None, :].expand(-1, kv_heads, -1)
        return torch.where(post_vision[:, None, :], kept_first, received)

    def accumulate_chunk(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        real: torch.Tensor,
        keys: torch.Tensor | None,
        previous: Any,
    ) -> PostVisionAttention:
        """The attention the post-vision queries so far pay the keys so far (:class:`PostVisionAttention`)."""
        state = self.state
        if keys is None:
            raise PressUsageError(
                f"{type(self).__name__} sums each chunk's post-vision attention over the keys so far, "
                "which this chunked prefill did not provide"
            )
        image_mask = require_image_mask(state.image_mask, real, type(self).__name__)
        seen = None if previous is None else previous.seen_image
        queries, restart, seen_image = post_vision_so_far(real, image_mask, seen)
        past = keys.shape[2] - real.shape[1]
        received = _received(state, module, hidden_states, keys, queries, past)
        count = queries.sum(-1)
        if previous is not None:
            # An image token in this chunk: the queries before it were not post-vision after all.
            carried = ~restart
            received[..., : previous.received.shape[-1]] += previous.received * carried[:, None, None]
            count = count + previous.count * carried
        return PostVisionAttention(received=received, count=count, seen_image=seen_image)


@dataclass
class PostVisionAttention:
    """What :meth:`VLCachePress.accumulate_chunk` keeps per KV layer across the chunks of one prompt.

    Per request and KV layer: ``batch x kv_heads x prompt_length`` float32 (``received``), and an
    int64 and a bool per sample.

    Attributes
    ----------
    received : torch.Tensor
        ``(batch, kv_heads, keys so far)`` float32: the attention the post-vision queries so far (those
        after the last image token so far) pay each key, summed over the queries and averaged over each
        KV head's query heads.
    count : torch.Tensor
        ``(batch,)`` int64, those queries.
    seen_image : torch.Tensor
        ``(batch,)`` bool, whether an image token has arrived.
    """

    received: torch.Tensor
    count: torch.Tensor
    seen_image: torch.Tensor


def _received(
    state: ScoringState,
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    queries: torch.Tensor,
    past: int,
) -> torch.Tensor:
    """``(batch, kv_heads, seq_len)`` float32: the attention ``queries`` (of the rows from ``past``) pay
    each key, summed over them and averaged over each KV head's query heads."""
    batch, kv_heads, seq_len, _ = keys.shape
    received = torch.zeros(batch, state.adapter.n_heads, seq_len, device=keys.device)
    for block in query_blocks(state, module, hidden_states, keys, queries, past=past):
        probs = masked_softmax(block.logits, block.visible[:, None])
        received += torch.einsum("bhrs,br->bhs", probs, block.queries.float())
    return mean_over_query_groups(received, kv_heads)
