"""Expected attention: score keys by the attention a Gaussian model of future queries would pay."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmshiftkv.models.adapter import rotate
from mmshiftkv.presses.attention import mean_over_query_groups
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.validation import check_bool, check_int, check_real


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
        key_mask = state.key_mask
        real = (
            key_mask
            if key_mask is not None
            else torch.ones(batch, seq_len, dtype=torch.bool, device=keys.device)
        )
        real_index = real.long().cumsum(-1) - 1
        sink = real & (real_index < self.n_sink)
        # The queries are those of the last n_queries keys: the whole prompt at prefill, the recent
        # tokens when a decoding press (kvpress's DecodingPress) hands a window of hidden states.
        n_queries = hidden_states.shape[1]
        stat_tokens = (real & ~sink)[:, seq_len - n_queries :]
        if not bool(stat_tokens.any(-1).all()):
            stat_tokens = real[:, seq_len - n_queries :]  # prompts of at most n_sink tokens: use them all

        queries = state.adapter.query_states(module, hidden_states).float()
        weights = stat_tokens[:, None, :, None].float()
        count = weights.sum(2, keepdim=True)
        raw_mean = (queries * weights).sum(2, keepdim=True) / count
        rotation = self.averaged_rotation(queries, module)[:, None]
        mean = torch.matmul(raw_mean, rotation.transpose(-1, -2)).squeeze(2)

        q_heads = queries.shape[1]
        expanded = keys.float().repeat_interleave(q_heads // kv_heads, dim=1)
        logits = torch.einsum("bhtd,bhd->bht", expanded, mean) * module.scaling
        if self.use_covariance:
            centered = (queries - raw_mean) * weights
            cov = torch.einsum("bhti,bhtj->bhij", centered, centered) / count
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
