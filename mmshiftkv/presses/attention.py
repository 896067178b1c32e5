"""Attention of chosen prefill queries over the prompt keys, shared by the attention-based presses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmshiftkv.allocators.layer_budgets import QueryBlock
from mmshiftkv.cache.attention import visible as mask_visibility
from mmshiftkv.models.adapter import ModelAdapter

if TYPE_CHECKING:
    from mmshiftkv.presses.base import ScoringState


def mean_over_query_groups(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average the query heads that share a KV head.

    ``(batch, q_heads, ...)`` -> ``(batch, kv_heads, ...)``; KV head ``h`` serves query heads
    ``[h*r, (h+1)*r)`` (the ``repeat_kv`` layout of Hugging Face models).
    """
    batch, q_heads = per_query_head.shape[:2]
    return per_query_head.view(batch, kv_heads, q_heads // kv_heads, *per_query_head.shape[2:]).mean(2)


def prompt_query_attention(
    adapter: ModelAdapter,
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor | None,
    n_queries: int,
    visibility: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the last ``n_queries`` prompt tokens over all prompt keys, as prefill computed it.

    Parameters
    ----------
    hidden_states : torch.Tensor
        Attention input, ``(batch, seq_len, hidden)``.
    keys : torch.Tensor
        RoPE'd prompt keys, ``(batch, kv_heads, seq_len, head_dim)``.
    positions : torch.Tensor
        Prefill positions, ``(batch, seq_len)`` or ``(3, batch, seq_len)`` (M-RoPE).
    key_mask : torch.Tensor or None
        ``(batch, seq_len)`` bool, True for real tokens.
    n_queries : int
        How many trailing prompt tokens act as queries.
    visibility : torch.Tensor, optional
        ``(batch, rows, seq_len)`` bool, the model's own visibility of the last ``rows >= n_queries``
        queries (non-causal image attention); default causal.

    Returns
    -------
    probs : torch.Tensor
        ``(batch, q_heads, n_queries, seq_len)`` float32 softmax (as visible, padding excluded); rows of
        padding queries are zero.
    query_valid : torch.Tensor
        ``(batch, n_queries)`` bool, False for padding queries.
    """
    batch, kv_heads, seq_len, _ = keys.shape
    queries = adapter.query_states(module, hidden_states[:, -n_queries:])
    queries = adapter.apply_rope(queries, positions[..., -n_queries:], module)
    q_heads = queries.shape[1]
    expanded = keys.repeat_interleave(q_heads // kv_heads, dim=1)
    logits = torch.matmul(queries.float(), expanded.float().transpose(-1, -2)) * module.scaling

    if visibility is not None and visibility.shape[1] >= n_queries and visibility.shape[2] == seq_len:
        visible = visibility[:, -n_queries:, :].to(keys.device)
    else:
        query_index = torch.arange(seq_len - n_queries, seq_len, device=keys.device)
        visible = torch.arange(seq_len, device=keys.device)[None, :] <= query_index[:, None]
        visible = visible[None].expand(batch, -1, -1)
    if key_mask is not None:
        visible = visible & key_mask[:, None, :]
    query_valid = visible.any(-1)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs, query_valid


def last_query_attention(
    state: ScoringState, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """Attention of the last prompt query over the prompt keys, averaged over each KV head's query heads.

    The score of LastAttn and of MM-ShiftKV without sampling (Table 5). ``hidden_states``: the
    attention input ``(batch, seq_len, hidden)``; ``keys``: ``(batch, kv_heads, seq_len, head_dim)``.
    Returns ``(batch, kv_heads, seq_len)``.
    """
    probs, _ = prompt_query_attention(
        state.adapter,
        module,
        hidden_states,
        keys,
        state.positions,
        state.key_mask,
        n_queries=1,
        visibility=state.visibility,
    )
    return mean_over_query_groups(probs[:, :, 0], keys.shape[1])


#: Floats of one block of attention logits (batch x query heads x rows x keys) in
#: :func:`query_blocks`: 4M float32 = 16 MB, whatever the prompt's length.
QUERY_BLOCK_ELEMENTS = 1 << 22


def query_blocks(
    state: ScoringState,
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    queries: torch.Tensor,
    block_elements: int = QUERY_BLOCK_ELEMENTS,
) -> Iterator[QueryBlock]:
    """Attention logits of the chosen prompt queries over all prompt keys, block by block.

    Queries are projected and rotated as the model does (:meth:`ModelAdapter.query_states`,
    :meth:`~ModelAdapter.apply_rope` at the prompt positions), block by block of consecutive rows so
    that a block's logits stay within ``block_elements`` floats; blocks holding none of the chosen
    queries are skipped. GQA without copying keys: the query heads of a KV head are stacked as rows.

    Parameters
    ----------
    state : ScoringState
        The prefill's state (positions, padding, the model's own mask).
    module : nn.Module
        The attention layer.
    hidden_states : torch.Tensor
        Its input, ``(batch, seq_len, hidden)``.
    keys : torch.Tensor
        The cached (rotated) prompt keys, ``(batch, kv_heads, seq_len, head_dim)``.
    queries : torch.Tensor
        ``(batch, seq_len)`` bool, the queries wanted.
    block_elements : int
        Bound on ``batch * q_heads * rows * seq_len`` per block.

    Yields
    ------
    QueryBlock
        Rows in increasing position; ``queries`` and ``visible`` exclude padding.
    """
    batch, kv_heads, seq_len, head_dim = keys.shape
    key_mask = state.key_mask
    if key_mask is None:
        key_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=keys.device)
    wanted = queries & key_mask
    q_heads = state.adapter.n_heads
    group = q_heads // kv_heads
    rows = max(1, block_elements // (batch * q_heads * seq_len))
    keys_t = keys.float().transpose(-1, -2)
    positions = torch.arange(seq_len, device=keys.device)
    chosen = wanted.any(0).nonzero()
    first = int(chosen[0]) if chosen.numel() else seq_len
    for start in range(first, seq_len, rows):
        stop = min(start + rows, seq_len)
        block_wanted = wanted[:, start:stop]
        if not bool(block_wanted.any()):
            continue
        query_states = state.adapter.query_states(module, hidden_states[:, start:stop])
        query_states = state.adapter.apply_rope(query_states, state.positions[..., start:stop], module)
        stacked = query_states.float().reshape(batch, kv_heads, group * (stop - start), head_dim)
        logits = torch.matmul(stacked, keys_t).view(batch, q_heads, stop - start, seq_len) * module.scaling
        if state.mask is not None:
            seen = mask_visibility(state.mask[:, 0, start:stop, :seq_len]).to(keys.device)
            seen = seen.expand(batch, -1, -1)
        else:
            seen = (positions[None, :] <= positions[start:stop, None])[None].expand(batch, -1, -1)
        yield QueryBlock(
            logits=logits,
            query_index=positions[start:stop],
            queries=block_wanted,
            visible=seen & key_mask[:, None, :],
        )
