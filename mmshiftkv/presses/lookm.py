"""LOOK-M: accumulated prompt attention, text before image, evicted KV merged into the kept KV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmshiftkv.presses.attention import attention_column_sums
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.errors import PressUsageError
from mmshiftkv.presses.merge import MERGE_RULES, MergeRule, merge_evicted
from mmshiftkv.presses.selection import select_kept_indices
from mmshiftkv.validation import check_bool, check_int, check_real

#: Priority classes of :meth:`LookMPress.select`, lowest first.
IMAGE, TEXT, RECENT, SINK = 0, 1, 2, 3


@dataclass(kw_only=True)
class LookMPress(BudgetedPress):
    """LOOK-M (Wan et al., "Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
    Inference", Findings of EMNLP 2024; code github.com/SUSTechBruce/LOOK-M).

    Per layer, at the end of prefill:

    1. score = H2O's accumulated attention ``A_s = sum_i A_p[i, :]``: the attention every prompt key
       receives from all prompt queries (causal, or the model's own mask; padding excluded), summed
       over the query heads of each KV head, in float32 and query blocks
       (:func:`~mmshiftkv.presses.attention.attention_column_sums`); under a chunked prefill each
       chunk's queries add their share against the keys so far (:meth:`accumulate_chunk`);
    2. each KV head keeps its ``recent`` most recent prompt tokens (the recent window ``M``) and fills
       the rest of its count with the best-scored others, **text before image** (``text_prior``, the
       paper's ``A_s[T] += max(A_s)``: every text token outranks every image token) — exactly its
       count: the budget is kept;
    3. the evicted tokens are merged into their most key-similar kept token (``merging``:
       :mod:`mmshiftkv.presses.merge`), changing the kept keys and values; the cache holds only the
       kept tokens.

    Image and video tokens are the prompt's placeholder tokens (its ``input_ids`` against the model
    config's image/video token ids); a text-only prompt is ranked as by H2O. Uniform and head-wise
    budgets (any allocator: allocators that need scores get the accumulated attention) compose.

    :meth:`reference` reproduces the released code where it keeps a budget; the differences:

    * the released text prior subtracts 65516 from image scores in fp16 (where every image score
      below 16 then rounds to the same value: the kept image tokens are picked by ``topk``'s tie
      order) and keeps every token scoring ``>= 0``, i.e. **every text token** whether or not it fits:
      with more non-recent text than heavy-hitter slots it keeps more than its budget. Here the
      priority is a class (no constant, no rounding) and the budget is exact: the top text tokens by
      attention fill the slots. Where the text fits, both keep the same set;
    * scores are summed over the batch there (one selection for the batch, the last sample's image
      positions) and it compresses only prompts with an image; here each sample is its own;
    * ``released_merge``: its average and weighted merges merge only a similarity-filtered subset of
      the evicted ranks, and its average merge adds the wrong evicted tokens into those targets (the
      first ``n_f`` of them; see :func:`~mmshiftkv.presses.merge.merge_evicted`). By default every
      evicted token is merged into its own target, as the paper describes;
    * its non-text-prior merges always keep the first 4 tokens (``n_sink=4`` in the preset);
    * MixKV's copy of the merge concatenates keys as ``[recent, selected]`` but values as
      ``[selected, recent]``; LOOK-M's own code keeps them aligned, as here.

    MEDA (NAACL 2025) is this press with ``merging="average"`` under MEDA's layer allocator. Through
    kvpress (:func:`mmshiftkv.interop.to_kvpress`) only the score travels: kvpress's wrappers select
    and store the tokens themselves, without the text prior or the merge.

    Parameters
    ----------
    merging : {"pivot", "average", "weighted"} or None, default="pivot"
        How evicted tokens are merged (the published run used pivot); None evicts (H2O + text prior).
    text_prior : bool, default=True
        Rank every text token above every image/video token (False: H2O's ranking).
    recent_share : float, default=0.5
        Share of each KV head's kept tokens given to the most recent prompt tokens (``int(count *
        recent_share)``); the released code splits its cache evenly (``hh_ratio = recent_ratio``).
    n_sink : int, default=0
        First real tokens always kept (the released non-text-prior merges: 4).
    hh_ratio, recent_ratio : float, optional
        The released code's budget: ``int(n * hh_ratio)`` heavy hitters plus a recent window of
        ``int(n * recent_ratio)`` tokens for an ``n``-token prompt (0.1 each there). Both or neither;
        exclusive with ``budget``, ``compression_ratio`` and ``allocator``.
    released_merge : bool, default=False
        Merge as the released code (the rank filter of the average/weighted merges, the average merge's
        misaligned sources). Needs ``merging``.
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    merging: MergeRule | None = "pivot"
    text_prior: bool = True
    recent_share: float = 0.5
    n_sink: int = 0
    hh_ratio: float | None = None
    recent_ratio: float | None = None
    released_merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merging is not None and self.merging not in MERGE_RULES:
            raise ValueError(f"merging must be one of {', '.join(MERGE_RULES)} or None, got {self.merging!r}")
        check_bool(self.text_prior, "text_prior")
        check_bool(self.released_merge, "released_merge")
        check_real(self.recent_share, "recent_share")
        if not 0 <= self.recent_share <= 1:
            raise ValueError(f"recent_share must be in [0, 1], got {self.recent_share}")
        check_int(self.n_sink, "n_sink", minimum=0)
        if self.released_merge and self.merging is None:
            raise ValueError("released_merge=True changes how evicted tokens are merged: set merging as well")
        if (self.hh_ratio is None) != (self.recent_ratio is None):
            raise ValueError("give both hh_ratio and recent_ratio (the released code's budget), or neither")
        if self.hh_ratio is not None:
            for name in ("hh_ratio", "recent_ratio"):
                check_real(getattr(self, name), name)
                if not 0 <= getattr(self, name) <= 1:
                    raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
            if self.budget is not None or self.compression_ratio > 0 or self.allocator is not None:
                raise ValueError(
                    "hh_ratio and recent_ratio set the budget (the released code's rule): do not pass "
                    "budget, compression_ratio or allocator with them"
                )

    @classmethod
    def reference(cls, **overrides) -> LookMPress:
        """The released code (``text_prior_<merging>_merge``, ``hh_ratio = recent_ratio = 0.1``) as a preset.

        Its budget rule, its merge details and its sinks for the non-text-prior merges; any field can
        be overridden, e.g. ``LookMPress.reference(merging="average")``, or ``reference(budget=64)``
        for its details under an absolute budget (recent window: half of it).
        """
        merging = overrides.get("merging", "pivot")
        text_prior = overrides.get("text_prior", True)
        preset: dict = dict(
            released_merge=merging is not None, n_sink=0 if text_prior or merging is None else 4
        )
        if overrides.get("budget") is None and not overrides.get("compression_ratio"):
            preset.update(hh_ratio=0.1, recent_ratio=0.1)
        return cls(**{**preset, **overrides})

    @property
    def asks_compression(self) -> bool:
        return super().asks_compression or self.hh_ratio is not None

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        accumulated = self.state.accumulated(module)
        if accumulated is not None:
            return accumulated  # a chunked prefill: every chunk's share, summed (accumulate_chunk)
        return self._column_sums(module, hidden_states, keys)

    def accumulate_chunk(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        real: torch.Tensor,
        keys: torch.Tensor | None,
        previous: Any,
    ) -> torch.Tensor:
        """The running accumulated attention ``(batch, kv_heads, keys so far)`` float32.

        The chunk's queries against the keys so far (causal within the chunk, padding excluded) add
        their column sums to the previous chunks' total, which grows by the chunk's keys (that no
        earlier query sees). Per request and KV layer: ``batch x kv_heads x prompt_length`` float32.
        """
        if keys is None:
            raise PressUsageError(
                f"{type(self).__name__} sums each chunk's attention over the keys so far, "
                "which this chunked prefill did not provide"
            )
        total = self._column_sums(module, hidden_states, keys, past=keys.shape[2] - hidden_states.shape[1])
        if previous is not None:
            total[..., : previous.shape[-1]] += previous
        return total

    def _column_sums(
        self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, past: int = 0
    ) -> torch.Tensor:
        """:func:`~mmshiftkv.presses.attention.attention_column_sums` of the queries of ``hidden_states``."""
        state = self.state
        queries = state.adapter.query_states(module, hidden_states)
        queries = state.adapter.apply_rope(queries, state.positions, module)
        return attention_column_sums(queries, keys, module.scaling, state.key_mask, state.mask, past=past)

    def kept_counts(self, layer: int, n_tokens: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        if self.hh_ratio is None:
            return super().kept_counts(layer, n_tokens, scores)
        # Python floats, as the released code computes int(T * ratio).
        counts = [min(n, int(n * self.hh_ratio) + int(n * self.recent_ratio)) for n in n_tokens.tolist()]
        kept = torch.tensor(counts, dtype=torch.long, device=n_tokens.device).clamp(min=1)
        return kept[:, None].expand(-1, self.state.adapter.n_kv_heads)

    def select(self, scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (sample, KV head): sinks, then the recent window, then text, then image, each by score.

        Within the sinks earlier tokens come first, within the window later ones (when a count is
        smaller than the window), within text and image the higher accumulated attention (ties: the
        lower index). The classes and ranks are folded into one exactly representable float per token
        for :func:`~mmshiftkv.presses.selection.select_kept_indices`.
        """
        state = self.state
        batch, kv_heads, seq_len = scores.shape
        device = scores.device
        n_tokens = state.n_tokens(batch, seq_len, device)
        position = torch.arange(seq_len, device=device)
        real_index = position - (seq_len - n_tokens)[:, None]  # left padding: real tokens are last
        level = torch.full((batch, kv_heads, seq_len), IMAGE, dtype=torch.long, device=device)
        level = level.masked_fill(self._text_mask(batch, seq_len, device)[:, None, :], TEXT)
        from_end = seq_len - position  # 1 for the last prompt token
        level = level.masked_fill(from_end <= self._recent_window(counts, n_tokens)[..., None], RECENT)
        level = level.masked_fill(((real_index >= 0) & (real_index < self.n_sink))[:, None, :], SINK)

        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        by_score = torch.empty_like(order).scatter_(-1, order, position.flip(0).expand_as(order).contiguous())
        within = torch.where(level == RECENT, position, by_score)
        within = torch.where(level == SINK, seq_len - 1 - position, within)
        # Exact in float32 while 4 * seq_len <= 2**24 (prompts up to 4M tokens).
        ranked = (level * seq_len + within).float()
        return select_kept_indices(ranked, counts, state.key_mask)

    def _recent_window(self, counts: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads)`` most recent prompt tokens each head keeps unconditionally."""
        if self.recent_ratio is not None:
            window = [int(n * self.recent_ratio) for n in n_tokens.tolist()]
            return torch.tensor(window, device=counts.device)[:, None].expand_as(counts)
        return (counts.double() * self.recent_share).long()

    def _text_mask(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """``(batch, seq_len)`` bool, True for tokens that rank as text (all of them without text prior)."""
        state = self.state
        image_mask = state.image_mask
        everything = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        if not self.text_prior or (image_mask is None and not state.adapter.media_token_ids):
            return everything
        if image_mask is None or tuple(image_mask.shape) != (batch, seq_len):
            got = "no input_ids (inputs_embeds?)" if image_mask is None else "token ids of another length"
            raise PressUsageError(
                f"{type(self).__name__}(text_prior=True) ranks text above image tokens, "
                f"which it finds in the prompt's input_ids, but this forward got {got}: "
                "pass input_ids, or set text_prior=False"
            )
        return ~image_mask.to(device)

    def merge(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        scores: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.merging is None:
            return None
        return merge_evicted(
            keys,
            values,
            indices,
            lengths,
            self.state.key_mask,
            rule=self.merging,
            as_released=self.released_merge,
        )
