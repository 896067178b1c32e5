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

#: Probabilities of one query block of :func:`attention_column_sums`: 64 MB of float32 temporaries.
COLUMN_SUM_BLOCK_ELEMENTS = 1 << 24


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

    rows = None
    if visibility is not None and visibility.shape[1] >= n_queries and visibility.shape[2] == seq_len:
        rows = visibility[:, -n_queries:, :]
    visible = query_visibility(batch, seq_len - n_queries, seq_len, seq_len, key_mask, rows, keys.device)
    return visible_softmax(logits, visible[:, None]), visible.any(-1)


def query_visibility(
    batch: int,
    start: int,
    stop: int,
    seq_len: int,
    key_mask: torch.Tensor | None,
    rows: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """``(batch, stop - start, seq_len)`` bool: the keys prompt queries ``[start, stop)`` may attend to.

    ``rows`` are the model's own visibility rows of those queries (non-causal image attention); None
    means causal. Padding keys (``key_mask`` False, ``(batch, seq_len)``) are never visible.
    """
    if rows is not None:
        visible = rows.to(device)
    else:
        query_index = torch.arange(start, stop, device=device)
        visible = torch.arange(seq_len, device=device)[None, :] <= query_index[:, None]
        visible = visible[None].expand(batch, -1, -1)
    if key_mask is not None:
        visible = visible & key_mask[:, None, :].to(device)
    return visible


def visible_softmax(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension among the ``visible`` keys; rows that see no key are zero."""
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)


def attention_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    past: int = 0,
) -> torch.Tensor:
    """H2O's accumulated attention: the attention every prompt key receives from all prompt queries.

    ``softmax(q k^T * scaling)`` over the keys each query sees (causal, or the model's own 4-D mask
    ``mask``; padding keys never, padding queries not at all),
    in float32, summed over the queries and over the query heads of each KV head. Computed in query
    blocks of at most :data:`COLUMN_SUM_BLOCK_ELEMENTS` probabilities: the ``seq_len x seq_len``
    matrix is never held.

    The queries may be the prompt's tokens ``[past, past + n_queries)`` only (one chunk of a chunked
    prefill, against the keys so far): the sums are then that chunk's share, and the chunks' shares
    add up to the whole prompt's (a key's column gets nothing from queries before it).

    Parameters
    ----------
    queries : torch.Tensor
        Rotated prompt queries, ``(batch, q_heads, n_queries, head_dim)``.
    keys : torch.Tensor
        Rotated prompt keys, ``(batch, kv_heads, seq_len, head_dim)``; KV head ``h`` serves query heads
        ``[h * r, (h + 1) * r)``.
    scaling : float
        The attention layer's logit scale.
    key_mask : torch.Tensor, optional
        ``(batch, seq_len)`` bool, True for real tokens.
    mask : torch.Tensor, optional
        The model's own 4-D mask ``(batch or 1, 1, n_queries, seq_len)`` (:attr:`ScoringState.mask`);
        None means causal.
    past : int, default=0
        Prompt tokens before the first query (``seq_len - n_queries`` for a chunk; 0: every query).

    Returns
    -------
    torch.Tensor
        ``(batch, kv_heads, seq_len)`` float32.
    """
    batch, kv_heads, seq_len, head_dim = keys.shape
    group = queries.shape[1] // kv_heads
    n_queries = queries.shape[2]
    keys_t = keys.float().transpose(-1, -2)[:, :, None]  # (batch, kv_heads, 1, head_dim, seq_len)
    grouped = queries.reshape(batch, kv_heads, group, n_queries, head_dim)
    block = max(1, COLUMN_SUM_BLOCK_ELEMENTS // (batch * queries.shape[1] * seq_len))
    total = torch.zeros(batch, kv_heads, seq_len, dtype=torch.float32, device=keys.device)
    for start in range(0, n_queries, block):
        stop = min(n_queries, start + block)
        rows = None if mask is None else mask_visibility(mask[:, 0, start:stop, :seq_len])
        visible = query_visibility(batch, past + start, past + stop, seq_len, key_mask, rows, keys.device)
        seen = torch.nonzero(visible.any(1).any(0))
        if seen.numel() == 0:
            continue
        # Causal queries see no key after the block's last one: those columns are skipped.
        width = int(seen.max()) + 1
        visible = visible[..., :width]
        real_query = visible.any(-1)
        # A padding query (it sees no key) gets a finite row and weight 0 instead of a NaN row.
        visible = visible | ~real_query[..., None]
        logits = torch.matmul(grouped[:, :, :, start:stop].float() * scaling, keys_t[..., :width])
        probs = torch.softmax(logits.masked_fill_(~visible[:, None, None], float("-inf")), dim=-1)
        total[..., :width] += torch.einsum("bhgqt,bq->bht", probs, real_query.float())
    return total


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
    past: int = 0,
) -> Iterator[QueryBlock]:
    """Attention logits of the chosen prompt queries over all prompt keys, block by block.

    Queries are projected and rotated as the model does (:meth:`ModelAdapter.query_states`,
    :meth:`~ModelAdapter.apply_rope` at the prompt positions), block by block of consecutive rows so
    that a block's logits stay within ``block_elements`` floats; blocks holding none of the chosen
    queries are skipped. GQA without copying keys: the query heads of a KV head are stacked as rows.

    ``hidden_states`` may hold the prompt's rows ``[past, seq_len)`` only (a chunk of a chunked
    prefill against the keys so far, or the trailing rows kept across chunks). ``state.positions``
    and the rows of ``state.mask`` are those of the prompt's last tokens (the whole prompt's, or the
    chunk's); without a mask the model's visibility rows ``state.visibility`` are used where they
    cover the block.

    Parameters
    ----------
    state : ScoringState
        The prefill's state (positions, padding, the model's own mask).
    module : nn.Module
        The attention layer.
    hidden_states : torch.Tensor
        Its input, ``(batch, n_rows, hidden)``: the prompt's rows ``[past, past + n_rows)``.
    keys : torch.Tensor
        The cached (rotated) prompt keys, ``(batch, kv_heads, seq_len, head_dim)``.
    queries : torch.Tensor
        ``(batch, n_rows)`` bool, the queries wanted.
    block_elements : int
        Bound on ``batch * q_heads * rows * seq_len`` per block.
    past : int, default=0
        Prompt tokens before the first row of ``hidden_states``.

    Yields
    ------
    QueryBlock
        Rows in increasing position; ``queries`` and ``visible`` exclude padding.
    """
    batch, kv_heads, seq_len, head_dim = keys.shape
    n_rows = hidden_states.shape[1]
    key_mask = state.real_tokens(batch, seq_len, keys.device)
    wanted = queries & key_mask[:, past:]
    q_heads = state.adapter.n_heads
    group = q_heads // kv_heads
    rows = max(1, block_elements // (batch * q_heads * seq_len))
    keys_t = keys.float().transpose(-1, -2)
    positions = torch.arange(seq_len, device=keys.device)
    visibility = state.visibility
    chosen = wanted.any(0).nonzero()
    first = int(chosen[0]) if chosen.numel() else n_rows
    for start in range(first, n_rows, rows):
        stop = min(start + rows, n_rows)
        block_wanted = wanted[:, start:stop]
        if not bool(block_wanted.any()):
            continue
        query_states = state.adapter.query_states(module, hidden_states[:, start:stop])
        at = past + start - (seq_len - state.positions.shape[-1])
        query_positions = state.positions[..., at : at + stop - start]
        query_states = state.adapter.apply_rope(query_states, query_positions, module)
        stacked = query_states.float().reshape(batch, kv_heads, group * (stop - start), head_dim)
        logits = torch.matmul(stacked, keys_t).view(batch, q_heads, stop - start, seq_len) * module.scaling
        query_index = positions[past + start : past + stop]
        if state.mask is not None:
            at = past + start - (seq_len - state.mask.shape[2])
            seen = mask_visibility(state.mask[:, 0, at : at + stop - start, :seq_len]).to(keys.device)
            seen = seen.expand(batch, -1, -1)
        elif visibility is not None and past + start >= seq_len - visibility.shape[1]:
            offset = past - (seq_len - visibility.shape[1])
            seen = visibility[:, offset + start : offset + stop].to(keys.device)
        else:
            seen = (positions[None, :] <= query_index[:, None])[None].expand(batch, -1, -1)
        yield QueryBlock(
            logits=logits,
            query_index=query_index,
            queries=block_wanted,
            visible=seen & key_mask[:, None, :],
        )
