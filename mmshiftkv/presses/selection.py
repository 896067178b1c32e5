"""The one rule that turns per-token scores into the prompt tokens each KV head keeps."""

from __future__ import annotations

import torch


def select_kept_indices(
    scores: torch.Tensor,
    n_kept: torch.Tensor | int,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, per (batch, KV head), the prompt tokens to keep.

    The rule shared by every press, the compiled op and the tests:

    * padding keys (``key_mask`` False) are never kept;
    * the last prompt token (index ``seq_len - 1``, the last real token under left padding)
      is always kept;
    * the other ``n_kept - 1`` slots go to the highest scores, ties broken towards the lower
      token index (a stable descending sort);
    * kept indices are returned in ascending (temporal) order.

    Parameters
    ----------
    scores : torch.Tensor
        Importance scores, shape ``(batch, kv_heads, seq_len)``. Higher is kept first.
    n_kept : torch.Tensor or int
        Tokens to keep per head, an int or a tensor of shape ``(batch, kv_heads)``. Clipped to
        ``[1, number of real tokens of the sample]``.
    key_mask : torch.Tensor, optional
        ``(batch, seq_len)`` bool, True for real tokens. None means every token is real.

    Returns
    -------
    indices : torch.Tensor
        ``(batch, kv_heads, max_kept)`` int64. Row ``(b, h)`` holds its ``lengths[b, h]`` kept
        indices in ascending order, then ``seq_len - 1`` as filler.
    lengths : torch.Tensor
        ``(batch, kv_heads)`` int64, the number of kept tokens per head.
    """
    batch, kv_heads, seq_len = scores.shape
    ranked = scores.float().masked_fill(torch.isnan(scores), float("-inf"))
    if key_mask is not None:
        ranked = ranked.masked_fill(~key_mask[:, None, :].bool(), float("-inf"))
        n_real = key_mask.bool().sum(-1).view(batch, 1).expand(batch, kv_heads)
    else:
        n_real = torch.full((batch, kv_heads), seq_len, dtype=torch.long, device=scores.device)
    # The last token is kept outside the ranking so that no score (not even +inf) can displace it.
    ranked[..., seq_len - 1] = float("-inf")

    lengths = torch.as_tensor(n_kept, dtype=torch.long, device=scores.device).expand(batch, kv_heads)
    lengths = torch.minimum(lengths.clamp(min=1), n_real.clamp(min=1))
    n_others = int(lengths.max()) - 1

    others = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n_others]
    beyond = torch.arange(n_others, device=scores.device) >= (lengths[..., None] - 1)
    # Sentinel seq_len sorts after every real index, then becomes the filler index.
    others = others.masked_fill(beyond, seq_len).sort(dim=-1).values
    last = torch.full((batch, kv_heads, 1), seq_len - 1, dtype=torch.long, device=scores.device)
    order = torch.cat([others, last], dim=-1)
    # Rows shorter than the longest: move the last token right after the row's own kept tokens.
    order = order.masked_fill(order == seq_len, seq_len - 1)
    return order, lengths
