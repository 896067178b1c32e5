"""Attention of new query tokens over a :class:`CompressedLayer`.

The query chunk (``q_len`` >= 1 tokens) sees every kept prompt token of its KV head, the tokens
generated before it, and itself and the earlier tokens of the chunk (causal). Extra restrictions
on the generated part (padding inside a batched question) come from the model's own mask: its
last ``generated + q_len`` columns describe exactly those tokens, while its prompt columns are
ignored because padding tokens are never kept.

GQA: query heads ``[h * r, (h + 1) * r)`` share KV head ``h``. Query heads are folded into the
rows of the bucket that holds their KV head, so a bucket is read by one
:func:`torch.nn.functional.scaled_dot_product_attention` call (whose fused kernels keep the
softmax in float32 for fp16/bf16 inputs). Dense rows without padding need no mask for
``q_len == 1``; packed rows are masked so that each query head sees its own head's segment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmshiftkv.cache.compressed_layer import CompressedLayer, RowBucket

# Query tokens of one chunk are processed in slices so that a boolean mask never exceeds this
# many elements (long questions appended after a long compressed prompt).
MASK_ELEMENT_BUDGET = 1 << 26


def tail_visibility(attention_mask: torch.Tensor | None, q_len: int, tail_len: int) -> torch.Tensor | None:
    """Which of the last ``tail_len`` logical keys each query token may see, from the model's mask.

    Parameters
    ----------
    attention_mask : torch.Tensor or None
        The mask transformers built for the layer: ``None`` (plain causal), a 4-D boolean
        ``(batch, 1, q_len, kv_len)`` mask (sdpa, True = visible), a 4-D additive float mask
        (eager, 0 = visible, very negative = hidden) or a 2-D ``(batch, kv_len)`` padding mask
        (flash attention).
    q_len : int
        Query tokens in the chunk.
    tail_len : int
        Generated tokens, the chunk included.

    Returns
    -------
    torch.Tensor or None
        ``(batch, q_len, tail_len)`` bool, or None when the plain causal rule applies.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2:
        tail = attention_mask[:, -tail_len:].bool()
        causal = torch.ones(q_len, tail_len, dtype=torch.bool, device=tail.device).tril(tail_len - q_len)
        return tail[:, None, :] & causal
    if attention_mask.ndim != 4:
        raise ValueError(f"unsupported attention mask of shape {tuple(attention_mask.shape)}")
    return visible(attention_mask[:, 0, -q_len:, -tail_len:])


def visible(mask: torch.Tensor) -> torch.Tensor:
    """Boolean visibility (True = may attend) of a boolean mask or an additive one (0 = visible)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _bucket_mask(
    bucket: RowBucket,
    group: int,
    tokens: range,
    generated: int,
    tail: torch.Tensor | None,
) -> torch.Tensor | None:
    """Boolean mask ``(n, rows, heads_per_row * group * len(tokens), key_len)`` or None.

    Query row ``i`` is query head ``i // len(tokens)`` of the row (KV head
    ``i // (group * len(tokens))`` of the row) at chunk token ``tokens[i % len(tokens)]``.
    ``generated`` counts generated tokens before the chunk; ``tail`` is this bucket's slice of
    :func:`tail_visibility`.
    """
    m = bucket.heads_per_row
    n, rows, key_len, _ = bucket.keys.shape
    device = bucket.keys.device
    tail_len = (key_len - bucket.prompt_len) // m
    # A single query token that is the newest key sees every generated token.
    sees_all_new = tail is None and len(tokens) == 1 and generated + tokens.stop == tail_len
    if bucket.owner is None and sees_all_new:
        return None
    owner = torch.arange(m, device=device).repeat_interleave(group * len(tokens))
    if bucket.owner is None:
        mask = torch.ones(n, rows, owner.shape[0], key_len, dtype=torch.bool, device=device)
    else:
        mask = bucket.owner[:, :, None, :] == owner[:, None].to(bucket.owner.dtype)
    if not sees_all_new:
        token = torch.arange(tokens.start, tokens.stop, device=device).repeat(m * group)
        new_token = torch.arange(tail_len, device=device).repeat_interleave(m)
        if tail is None:
            visible = new_token[None, :] <= generated + token[:, None]
        else:
            visible = tail[:, token][:, :, new_token]
        mask[..., bucket.prompt_len :] &= visible.view(-1, 1, owner.shape[0], m * tail_len)
    return mask


def compressed_sdpa(
    layer: CompressedLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of a query chunk over a compressed layer that already holds the chunk's keys.

    Parameters
    ----------
    layer : CompressedLayer
        Updated with the chunk's keys and values.
    query : torch.Tensor
        ``(batch, q_heads, q_len, head_dim)``.
    attention_mask : torch.Tensor or None
        The model's mask for this layer (see :func:`tail_visibility`).
    scaling : float, optional
        Softmax scale, default ``head_dim ** -0.5``.
    dropout : float
        Attention dropout probability.

    Returns
    -------
    torch.Tensor
        ``(batch, q_len, q_heads, head_dim)``, the layout transformers' attention functions return.
    """
    batch, q_heads, q_len, head_dim = query.shape
    group = q_heads // layer.kv_heads
    generated = layer.generated_length - q_len
    tail = tail_visibility(attention_mask, q_len, layer.generated_length)
    output = query.new_empty(batch, q_len, q_heads, head_dim)
    for bucket in layer.buckets:
        n, rows, key_len, _ = bucket.keys.shape
        per_row = bucket.heads_per_row * group
        bucket_query = query if bucket.covers_batch else query.index_select(0, bucket.samples)
        bucket_query = bucket_query.reshape(n, rows, per_row, q_len, head_dim)
        bucket_tail = tail if tail is None or bucket.covers_batch else tail.index_select(0, bucket.samples)
        step = max(1, MASK_ELEMENT_BUDGET // (n * rows * per_row * key_len))
        pieces = []
        for first in range(0, q_len, step):
            tokens = range(first, min(first + step, q_len))
            mask = _bucket_mask(bucket, group, tokens, generated, bucket_tail)
            chunk = bucket_query[:, :, :, tokens.start : tokens.stop].reshape(n, rows, -1, head_dim)
            chunk = F.scaled_dot_product_attention(
                chunk, bucket.keys, bucket.values, attn_mask=mask, dropout_p=dropout, scale=scaling
            )
            pieces.append(chunk.reshape(n, rows, per_row, len(tokens), head_dim))
        result = torch.cat(pieces, dim=3) if len(pieces) > 1 else pieces[0]
        result = result.reshape(n, q_heads, q_len, head_dim).transpose(1, 2)
        if bucket.covers_batch:
            return result
        output.index_copy_(0, bucket.samples, result)
    return output


# ---------------------------------------------------------------------------
# flash-attn path. UNTESTED on a GPU: flash-attn is not installable where this was written; the
# gather / cu_seqlens logic is tested on CPU with a plain-torch stand-in for the kernel.
# ---------------------------------------------------------------------------
VarlenFunction = Callable[..., torch.Tensor]


def compressed_flash_varlen(
    layer: CompressedLayer,
    query: torch.Tensor,
    scaling: float | None,
    varlen: VarlenFunction,
) -> torch.Tensor:
    """Same result as :func:`compressed_sdpa` (plain causal masks only) with ``flash_attn_varlen_func``.

    Every (sample, KV head) becomes one variable-length sequence: its kept prompt tokens and
    generated tokens are gathered back to back (one copy of the layer's keys and values per
    call), its ``group`` query heads attend with ``causal=True`` (flash-attn >= 2.1 aligns the
    causal mask to the end of the keys, so the whole prompt stays visible).

    Parameters
    ----------
    layer : CompressedLayer
        Updated with the chunk's keys and values.
    query : torch.Tensor
        ``(batch, q_heads, q_len, head_dim)``.
    scaling : float, optional
        Softmax scale.
    varlen : callable
        ``flash_attn.flash_attn_varlen_func`` or a function with its signature.

    Returns
    -------
    torch.Tensor
        ``(batch, q_len, q_heads, head_dim)``.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, generated = layer.kv_heads, layer.generated_length
    group = q_heads // kv_heads
    output = query.new_empty(batch, q_len, q_heads, head_dim)
    for bucket in layer.buckets:
        n, rows, key_len, _ = bucket.keys.shape
        m, device = bucket.heads_per_row, bucket.keys.device
        pairs = n * kv_heads
        lengths = (bucket.ends - bucket.starts).flatten()
        row_base = (torch.arange(n * rows, device=device) * key_len).repeat_interleave(m)
        first = torch.cumsum(lengths, 0) - lengths
        prompt = torch.repeat_interleave(row_base + bucket.starts.flatten() - first, lengths)
        prompt = prompt + torch.arange(prompt.shape[0], device=device)
        head_in_row = torch.arange(pairs, device=device) % m
        new = (row_base + bucket.prompt_len + head_in_row)[:, None] + m * torch.arange(
            generated, device=device
        )
        owner = torch.cat(
            [
                torch.repeat_interleave(torch.arange(pairs, device=device), lengths),
                torch.arange(pairs, device=device).repeat_interleave(generated),
            ]
        )
        source = torch.cat([prompt, new.flatten()])[torch.sort(owner, stable=True).indices]
        keys = bucket.keys.reshape(-1, head_dim).index_select(0, source).unsqueeze(1)
        values = bucket.values.reshape(-1, head_dim).index_select(0, source).unsqueeze(1)
        cu_keys = F.pad(torch.cumsum(lengths + generated, 0), (1, 0)).to(torch.int32)
        cu_query = (torch.arange(pairs + 1, device=device) * q_len).to(torch.int32)

        bucket_query = query if bucket.covers_batch else query.index_select(0, bucket.samples)
        bucket_query = bucket_query.reshape(n, kv_heads, group, q_len, head_dim).permute(0, 1, 3, 2, 4)
        result = varlen(
            bucket_query.reshape(pairs * q_len, group, head_dim),
            keys,
            values,
            cu_query,
            cu_keys,
            q_len,
            bucket.max_length + generated,
            softmax_scale=scaling,
            causal=True,
        )
        result = (
            result.view(n, kv_heads, q_len, group, head_dim)
            .transpose(1, 2)
            .reshape(n, q_len, q_heads, head_dim)
        )
        if bucket.covers_batch:
            return result
        output.index_copy_(0, bucket.samples, result)
    return output
