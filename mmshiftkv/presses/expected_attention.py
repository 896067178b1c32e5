"""Expected attention: score keys by the attention a Gaussian model of future queries would pay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmshiftkv.models.adapter import rotate
from mmshiftkv.presses.attention import mean_over_query_groups
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.moments import Moments
from mmshiftkv.validation import check_bool, check_int, check_real


@dataclass
class QueryStatistics:
    """Running moments of one layer's pre-RoPE prompt queries, ``(batch, heads, head_dim)`` features.

    Attributes
    ----------
    real_seen : torch.Tensor
        ``(batch,)`` real tokens folded in so far (which of the next ones are sinks).
    sinks, others : Moments
        Of the first ``n_sink`` real tokens, and of the rest.
    """

    real_seen: torch.Tensor
    sinks: Moments
    others: Moments


@dataclass(kw_only=True)
class ExpectedAttentionPress(BudgetedPress):
    """Expected attention (Devoto et al., 2025) with M-RoPE-correct future positions.

    Following kvpress's algorithm: the mean ``mu`` and covariance ``S`` of the pre-RoPE prompt
    queries (the first ``n_sink`` real tokens excluded) are rotated by the RoPE matrix averaged over
    the next ``n_future_positions`` decode positions, ``R = mean_p R(p)``; the score of key ``k`` is
    ``softmax_t(k.R mu * s + 1/2 * k^T R S R^T k * s^2)`` (``s`` the attention scaling), averaged
    over the query heads of a KV head and multiplied by ``||v||``. The future positions start at the
    true next decode position (``max(prompt positions) + 1``: Qwen2-VL's ``rope_deltas`` included)
    instead of kvpress's ``seq_len``, which also fixes kvpress's crash on 3-D M-RoPE positions. Sinks
    are always kept. Given a window of recent hidden states (kvpress's decoding presses, through
    :func:`~mmshiftkv.interop.kvpress.to_kvpress`), the statistics are those of the window's queries.
    Under a chunked prefill the query moments are merged chunk by chunk (:class:`QueryStatistics`, the
    same algorithm as in one forward).

    Parameters
    ----------
    n_future_positions : int, default=512
        Future decode positions the rotation is averaged over.
    n_sink : int, default=4
        First real prompt tokens excluded from the statistics and always kept.
    use_covariance : bool, default=True
        Include the covariance term.
    use_vnorm : bool, default=True
        Multiply scores by the value norm.
    epsilon : float, default=0.0
        Added to the attention before the value-norm rescaling.
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.n_future_positions, "n_future_positions", minimum=1)
        check_int(self.n_sink, "n_sink", minimum=0)
        check_bool(self.use_covariance, "use_covariance")
        check_bool(self.use_vnorm, "use_vnorm")
        check_real(self.epsilon, "epsilon")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def averaged_rotation(self, like: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """``mean_p R(p)`` over the future positions, ``(batch, head_dim, head_dim)`` float32.

        ``R(p) x`` is linear in the rotary embedding's cos/sin, so the mean rotation is the rotation
        by the mean cos/sin, built by rotating the unit vectors with the model's own rule (half or
        pairwise, partial rotary included).
        """
        adapter, positions = self.state.adapter, self.state.positions
        offsets = torch.arange(self.n_future_positions, device=like.device)
        future = adapter.future_positions(positions, offsets)
        cos, sin = adapter.rotary_cos_sin(like.float(), future, module)
        cos, sin = cos.float().mean(1, keepdim=True), sin.float().mean(1, keepdim=True)
        head_dim = like.shape[-1]
        basis = torch.eye(head_dim, device=like.device).expand(cos.shape[0], head_dim, head_dim)
        # Row j of the rotated basis is R e_j, the j-th column of R.
        return rotate(basis, cos, sin, adapter.rotation_style or "half").transpose(-1, -2)

    def accumulate_chunk(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        real: torch.Tensor,
        keys: torch.Tensor | None,
        previous: QueryStatistics | None,
    ) -> QueryStatistics:
        """Fold a chunk's pre-RoPE queries (sinks apart) into the layer's :class:`QueryStatistics`."""
        if previous is None:
            return self._query_statistics(
                module, hidden_states, real, real.new_zeros(real.shape[0], dtype=torch.long)
            )
        chunk = self._query_statistics(module, hidden_states, real, previous.real_seen)
        return QueryStatistics(
            chunk.real_seen, previous.sinks.merge(chunk.sinks), previous.others.merge(chunk.others)
        )

    def _query_statistics(
        self, module: nn.Module, hidden_states: torch.Tensor, real: torch.Tensor, earlier: torch.Tensor
    ) -> QueryStatistics:
        """:class:`QueryStatistics` of the real rows of ``hidden_states``, after ``earlier`` ``(batch,)``
        real tokens of the prompt."""
        queries = self.state.adapter.query_states(module, hidden_states).transpose(1, 2)  # (b, n, h, d)
        real_index = earlier[:, None] + real.long().cumsum(-1) - 1
        sink = real & (real_index < self.n_sink)
        sinks = Moments.of(queries, sink, covariance=self.use_covariance)
        others = Moments.of(queries, real & ~sink, covariance=self.use_covariance)
        return QueryStatistics(earlier + real.sum(-1), sinks, others)

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
        real = state.real_tokens(batch, seq_len, keys.device)
        real_index = real.long().cumsum(-1) - 1
        sink = real & (real_index < self.n_sink)
        statistics = state.accumulated(module)
        if statistics is None:
            # The queries are those of the last n_queries keys: the whole prompt at prefill, the recent
            # tokens when a decoding press (kvpress's DecodingPress) hands a window of hidden states.
            n_queries = hidden_states.shape[1]
            earlier = real[:, : seq_len - n_queries].sum(-1)
            statistics = self._query_statistics(
                module, hidden_states, real[:, seq_len - n_queries :], earlier
            )
        moments = statistics.others
        if not bool((moments.count > 0).all()):
            moments = moments.merge(statistics.sinks)  # prompts of at most n_sink tokens: use them all

        raw_mean = moments.mean.float()  # (batch, heads, head_dim)
        rotation = self.averaged_rotation(raw_mean, module)[:, None]
        mean = torch.matmul(raw_mean[:, :, None], rotation.transpose(-1, -2)).squeeze(2)

        q_heads = raw_mean.shape[1]
        expanded = keys.float().repeat_interleave(q_heads // kv_heads, dim=1)
        logits = torch.einsum("bhtd,bhd->bht", expanded, mean) * module.scaling
        if self.use_covariance:
            cov = (moments.m2 / moments.count.clamp(min=1)[:, None, None, None]).float()
            cov = rotation @ cov @ rotation.transpose(-1, -2)
            logits = (
                logits
                + 0.5 * torch.einsum("bhti,bhij,bhtj->bht", expanded, cov, expanded) * module.scaling**2
            )
        logits = logits.masked_fill(~real[:, None, :], float("-inf"))
        scores = mean_over_query_groups(torch.softmax(logits, dim=-1), kv_heads)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.float().norm(dim=-1)
        return scores.masked_fill(sink[:, None, :], float("inf"))
