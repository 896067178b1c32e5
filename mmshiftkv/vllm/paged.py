"""Read a request's keys and values back from vLLM's paged KV cache, in a layout learned, not assumed.

Under chunked prefill a prompt's earlier chunks are in the paged cache when its last chunk is scored.
Where a backend puts a slot's features differs by backend and CPU ISA (vLLM's CPU backend stores
each block's keys feature-major, its AMX path packs them in tiles, FlashAttention keeps keys and
values in two halves of the tensor). :func:`learn_layout` finds out at engine start: it writes
patterns through the backend's own ``do_kv_cache_update`` into two blocks (no request runs yet) and
records where each (slot offset, KV head, feature) element landed, then checks the learned reader on
random values in other blocks. A layout it cannot learn exactly (a quantized cache, blocks that are
not equally strided) raises :class:`~mmshiftkv.vllm.config.EngineConfigError` naming the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmshiftkv.vllm.config import EngineConfigError


@dataclass
class BlockMap:
    """Where one block's keys (or values) lie in a layer's cache, flattened to its storage order.

    Attributes
    ----------
    base : int
        Flat index of the first element of block 0.
    stride : int
        Flat distance from a block to the next.
    local : torch.Tensor
        ``(block_size, kv_heads, head_dim)`` int64: each element's flat index minus ``base``, in block 0.
    span : int
        Flat elements from a block's first to its last of these, ``local.max() + 1``.
    """

    base: int
    stride: int
    local: torch.Tensor
    span: int

    def read(self, flat: torch.Tensor, block_ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """The first ``n_tokens`` slots of the blocks ``block_ids``, ``(n_tokens, kv_heads, head_dim)``."""
        count = (flat.numel() - self.base - self.span) // self.stride + 1
        blocks = flat.as_strided((count, self.span), (self.stride, 1), flat.storage_offset() + self.base)
        rows = blocks[block_ids[:, None, None, None], self.local[None]]  # (blocks, block_size, heads, dim)
        return rows.flatten(0, 1)[:n_tokens]


@dataclass
class PagedLayout:
    """The learned layout of every layer's paged cache (one KV cache group: they all share it)."""

    keys: BlockMap
    values: BlockMap
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def read(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a request's first ``n_tokens`` slots, ``(n_tokens, kv_heads, head_dim)`` each.

        ``block_ids`` are the request's blocks in order (slot ``p`` is offset ``p % block_size`` of
        block ``block_ids[p // block_size]``).
        """
        flat = _flat(kv_cache)
        return self.keys.read(flat, block_ids, n_tokens), self.values.read(flat, block_ids, n_tokens)


def learn_layout(attn, kv_cache: torch.Tensor, block_size: int, dtype: torch.dtype) -> PagedLayout:
    """Learn ``attn``'s cache layout from the backend's own writes; check it on other blocks.

    ``dtype`` is the model's: keys and values reach ``do_kv_cache_update`` in it.

    Call before any request runs: it overwrites blocks of ``kv_cache`` (free blocks' contents are never
    read before a request writes them) and leaves the cache zeroed.

    Raises
    ------
    EngineConfigError
        If the learned reader does not return exactly what the backend wrote.
    """
    backend = type(attn.impl).__name__
    flat = _flat(kv_cache, backend)
    per_block = 2 * block_size * attn.num_kv_heads * attn.head_size
    num_blocks = flat.numel() // per_block
    if num_blocks < 3 or num_blocks * per_block != flat.numel():
        raise EngineConfigError(
            f"mmshiftkv.vllm cannot read {backend}'s KV cache: its {flat.numel()} elements are not "
            f"three or more blocks of {block_size} slots x {attn.num_kv_heads} KV heads x "
            f"{attn.head_size} features, keys and values"
        )
    try:
        first, second = (_locate(attn, kv_cache, flat, block, block_size, dtype) for block in (0, 1))
        maps = [_block_map(a, b, backend) for a, b in zip(first, second)]
        layout = PagedLayout(maps[0], maps[1], tuple(kv_cache.shape), tuple(kv_cache.stride()))
        _check_round_trip(layout, attn, kv_cache, block_size, num_blocks, dtype, backend)
    finally:
        flat.zero_()
    return layout


def check_layer(layout: PagedLayout, attn, kv_cache: torch.Tensor) -> None:
    """Refuse a layer whose cache is not shaped like the one the layout was learned on."""
    if tuple(kv_cache.shape) != layout.shape or tuple(kv_cache.stride()) != layout.stride:
        raise EngineConfigError(
            f"mmshiftkv.vllm: {attn.layer_name}'s KV cache is shaped {tuple(kv_cache.shape)} with strides "
            f"{tuple(kv_cache.stride())}, unlike the first layer's {layout.shape} / {layout.stride}"
        )


def _flat(kv_cache: torch.Tensor, backend: str = "the attention backend") -> torch.Tensor:
    """The cache's elements in storage order (a view)."""
    order = sorted(range(kv_cache.dim()), key=lambda dim: kv_cache.stride(dim), reverse=True)
    if not kv_cache.permute(order).is_contiguous():  # in some dimension order, one dense region
        raise EngineConfigError(
            f"mmshiftkv.vllm cannot read {backend}'s KV cache: its tensor is not one dense region"
        )
    return kv_cache.as_strided((kv_cache.numel(),), (1,), kv_cache.storage_offset())


def _locate(
    attn, kv_cache: torch.Tensor, flat: torch.Tensor, block: int, block_size: int, dtype: torch.dtype
):
    """Flat indices of every (offset, head, feature) of ``block``'s keys and values, each
    ``(block_size, kv_heads, head_dim)``: one write marks the block's elements, then one write per bit
    of the element number tells them apart (values 1..4 are exact in every float cache dtype)."""
    shape = (block_size, attn.num_kv_heads, attn.head_size)
    element = torch.arange(math.prod(shape), device=flat.device).reshape(shape)
    slots = torch.arange(block * block_size, (block + 1) * block_size, device=flat.device)

    def write(keys: torch.Tensor, values: torch.Tensor) -> None:
        attn.impl.do_kv_cache_update(attn, keys.to(dtype), values.to(dtype), kv_cache, slots)

    flat.zero_()
    write(torch.ones(shape, device=flat.device), torch.full(shape, 3.0, device=flat.device))
    where = [torch.nonzero(flat == mark)[:, 0] for mark in (1, 3)]
    found = []
    for positions in where:
        if positions.numel() != element.numel():
            return None  # the block's elements did not land one per flat element
        found.append(torch.zeros(element.numel(), dtype=torch.long, device=flat.device))
    for bit in range(max(1, (element.numel() - 1).bit_length())):
        ones = ((element >> bit) & 1).float()
        write(1 + ones, 3 + ones)
        for number, positions, mark in zip(found, where, (1, 3)):
            number += (flat[positions].float() - mark).round().long() << bit
    located = []
    for number, positions in zip(found, where):
        index = torch.full_like(number, -1)
        index[number.clamp(0, number.numel() - 1)] = positions
        located.append(index.reshape(shape))
    return located


def _block_map(first: torch.Tensor | None, second: torch.Tensor | None, backend: str) -> BlockMap:
    """Block 0's and block 1's flat indices as a :class:`BlockMap` (blocks equally strided)."""
    if first is None or second is None or bool((first < 0).any()):
        raise EngineConfigError(
            f"mmshiftkv.vllm cannot read {backend}'s KV cache: a block's keys and values do not land one "
            "element per slot feature (a quantized or packed cache); use an unquantized KV cache dtype"
        )
    steps = (second - first).unique()
    if steps.numel() != 1 or int(steps) <= 0:
        raise EngineConfigError(
            f"mmshiftkv.vllm cannot read {backend}'s KV cache: its blocks are not equally strided"
        )
    base = int(first.min())
    local = first - base
    return BlockMap(base=base, stride=int(steps), local=local, span=int(local.max()) + 1)


def _check_round_trip(
    layout: PagedLayout,
    attn,
    kv_cache: torch.Tensor,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype,
    backend: str,
) -> None:
    """Random keys and values written to slots of the last and a middle block read back exactly."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.tensor([num_blocks - 1, num_blocks // 2])
    shape = (2 * block_size, attn.num_kv_heads, attn.head_size)
    device = kv_cache.device
    keys, values = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2))
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten().to(device)
    attn.impl.do_kv_cache_update(attn, keys, values, kv_cache, slots)
    read_keys, read_values = layout.read(kv_cache, blocks.to(device), 2 * block_size)
    if not (torch.equal(read_keys.to(dtype), keys) and torch.equal(read_values.to(dtype), values)):
        raise EngineConfigError(
            f"mmshiftkv.vllm cannot read {backend}'s KV cache: keys and values written through its "
            "do_kv_cache_update do not read back from the layout learned for it, and the plugin reads "
            "a prompt's earlier prefill chunks from the cache"
        )
