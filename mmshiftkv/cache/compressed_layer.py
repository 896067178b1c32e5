"""A transformers cache layer holding each (batch, KV head) pair's own number of prompt tokens.

Layout
------
The layer is a list of :class:`RowBucket`. A bucket holds some samples of the batch; every sample
owns ``rows`` rows of keys (and values), each row holding the kept prompt tokens of
``heads_per_row`` consecutive KV heads back to back, then the generated tokens of those heads:

* **dense rows** (``heads_per_row == 1``, ``rows == kv_heads``), chosen when every sample keeps the
  same number of tokens in all its heads (uniform budgets): the classic
  ``(batch, kv_heads, seq, head_dim)`` layout, read by one SDPA call, without a mask when
  decoding one token at a time;
* **packed rows** (``heads_per_row == kv_heads``, ``rows == 1``), chosen for head-wise budgets: the
  heads of a sample are concatenated, so a head keeps exactly its own budget. Attention then
  masks each query head to its KV head's segment (see :mod:`mmshiftkv.cache.attention`).

Rows of one bucket share a padded length; samples go to buckets by their row length so that the
padding stays below ``padding_tolerance`` of the ideal size with at most ``max_buckets`` buckets
(uniform lengths: one bucket, no padding). Generated tokens are appended to every row,
interleaved token-major in packed rows (``token * heads_per_row + head``), so an update is one
``torch.cat`` per bucket, as in :class:`transformers.DynamicLayer`.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from mmshiftkv.cache.reading import READING, reading_model


@dataclass
class RowBucket:
    """Samples of one layer whose rows share one padded prompt length.

    Attributes
    ----------
    samples : torch.Tensor
        ``(n,)`` int64, ascending batch indices of the samples held here.
    keys, values : torch.Tensor
        ``(n, rows, prompt_len + heads_per_row * generated, head_dim)``.
    starts, ends : torch.Tensor
        ``(n, rows, heads_per_row)`` int64: KV head ``row * heads_per_row + j`` of a sample keeps
        its prompt tokens at ``[starts[..., j], ends[..., j])`` of its row.
    owner : torch.Tensor or None
        ``(n, rows, prompt_len + heads_per_row * generated)`` int8 (int16 beyond 127 heads): the
        KV head, within its row, that each key belongs to; -1 for padding. None for dense rows
        without padding, where every key belongs to its row's head.
    heads_per_row : int
        1 (dense rows) or ``kv_heads`` (packed rows).
    prompt_len : int
        Padded prompt part of every row.
    max_length : int
        Largest number of prompt tokens one KV head keeps in this bucket.
    padded : bool
        Whether some row holds fewer than ``prompt_len`` prompt tokens.
    covers_batch : bool
        Whether ``samples`` is the whole batch in order (no gather/scatter needed).
    """

    samples: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    owner: torch.Tensor | None
    heads_per_row: int
    prompt_len: int
    max_length: int
    padded: bool
    covers_batch: bool


def bucket_rows(row_lengths: list[int], tolerance: float, max_buckets: int) -> list[list[int]]:
    """Group samples by row length so that padding to each group's longest row stays small.

    Greedy over samples sorted by decreasing length: a sample joins the current group while the
    group's padding stays within ``tolerance`` of its ideal size. If that needs more than
    ``max_buckets`` groups, the tolerance is doubled until it does not.

    Parameters
    ----------
    row_lengths : list of int
        Prompt tokens of one row of each sample, ``batch`` entries.
    tolerance : float
        Allowed padding as a fraction of the ideal (unpadded) size.
    max_buckets : int
        Largest number of groups.

    Returns
    -------
    list of list of int
        Groups of sample indices, each ascending.
    """
    order = sorted(range(len(row_lengths)), key=lambda i: (-row_lengths[i], i))
    while True:
        groups: list[list[int]] = []
        longest = ideal = 0
        for i in order:
            size = row_lengths[i]
            if groups and longest * (len(groups[-1]) + 1) - (ideal + size) <= tolerance * (ideal + size):
                groups[-1].append(i)
                ideal += size
            else:
                groups.append([i])
                longest = ideal = size
        if len(groups) <= max_buckets:
            return [sorted(group) for group in groups]
        tolerance = max(2 * tolerance, 1e-3)


def _owner_dtype(heads_per_row: int) -> torch.dtype:
    return torch.int8 if heads_per_row <= torch.iinfo(torch.int8).max else torch.int16


@functools.cache
def crop_takes_absolute_length() -> bool:
    """Whether this transformers' ``DynamicLayer.crop(n)`` takes a target length (True, before 5.16) or
    the number of tokens to remove (False: positive values are rejected), measured on a 2-token layer."""
    probe = DynamicLayer()
    probe.update(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1))
    try:
        probe.crop(1)
    except (ValueError, RuntimeError):
        return False
    return probe.get_seq_length() == 1


class CompressedLayer(CacheLayerMixin):
    """Cache layer after prefill compression, with per-(batch, KV head) prompt lengths.

    Build it with :meth:`from_selection`. Its lengths are *logical*: :meth:`get_seq_length` is the
    original prompt length plus the generated tokens, so positions, masks and ``crop`` behave as
    for the uncompressed cache. Attention must read it through
    :func:`mmshiftkv.cache.compressed_attention` of the model it was built for (``reader``):
    :meth:`update` refuses any other caller, since the model's own attention would silently attend
    to the new tokens only. The layer refers to that model weakly (it does not keep it alive); a
    deep copy belongs to the same model (or to the model's copy when both are copied together), and
    a pickled layer, loaded elsewhere, to no model object: any model inside ``compressed_attention``
    may read it there.

    With uniform budgets (one dense bucket, no padding) :attr:`keys` / :attr:`values` are the
    familiar ``(batch, kv_heads, kept + generated, head_dim)`` tensors; head-wise layers have no
    such tensor and raise on access (read :attr:`buckets`).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        buckets: list[RowBucket],
        prompt_lengths: torch.Tensor,
        original_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        reader: nn.Module | None = None,
    ) -> None:
        self.buckets = buckets
        super().__init__()
        self._reader = None if reader is None else weakref.ref(reader)
        self._prompt_lengths = prompt_lengths
        self.original_length = original_length
        self.generated_length = 0
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.is_initialized = True

    @classmethod
    def from_selection(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        lengths: torch.Tensor,
        seq_len: int | None = None,
        *,
        padding_tolerance: float = 0.02,
        max_buckets: int = 4,
        reader: nn.Module | None = None,
    ) -> CompressedLayer:
        """Keep, per (batch, KV head), the prompt tokens a press selected.

        Parameters
        ----------
        keys, values : torch.Tensor
            ``(batch, kv_heads, cached_len, head_dim)``, the prefill cache of the layer.
        indices : torch.Tensor
            ``(batch, kv_heads, max_kept)`` int64; row ``(b, h)`` keeps
            ``indices[b, h, :lengths[b, h]]`` (the rest is ignored), as returned by
            :func:`mmshiftkv.presses.selection.select_kept_indices`.
        lengths : torch.Tensor
            ``(batch, kv_heads)`` int64 in ``[0, max_kept]``.
        seq_len : int, optional
            Logical prompt length the model has seen (positions continue after it). Defaults to
            ``cached_len``.
        padding_tolerance : float
            Padding allowed when grouping samples of different lengths, as a fraction of the
            ideal size.
        max_buckets : int
            Largest number of sample groups; the tolerance grows if more would be needed.
        reader : nn.Module, optional
            The model whose ``compressed_attention`` may read the layer (presses pass the model they
            run on). None: any model inside ``compressed_attention``.

        Returns
        -------
        CompressedLayer
        """
        if keys.ndim != 4 or values.shape != keys.shape:
            raise ValueError(
                f"keys and values must share a (batch, kv_heads, seq_len, head_dim) shape, got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        batch, kv_heads, cached_len, head_dim = keys.shape
        if indices.ndim != 3 or tuple(indices.shape[:2]) != (batch, kv_heads):
            raise ValueError(
                f"indices must have shape ({batch}, {kv_heads}, max_kept), got {tuple(indices.shape)}"
            )
        if tuple(lengths.shape) != (batch, kv_heads):
            raise ValueError(f"lengths must have shape ({batch}, {kv_heads}), got {tuple(lengths.shape)}")
        if indices.dtype.is_floating_point or lengths.dtype.is_floating_point:
            raise TypeError("indices and lengths must be integer tensors")
        if padding_tolerance < 0:
            raise ValueError(f"padding_tolerance must be >= 0, got {padding_tolerance}")
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
        seq_len = cached_len if seq_len is None else seq_len
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        max_kept = indices.shape[2]
        lengths_list: list[list[int]] = lengths.tolist()
        flat_lengths = [n for row in lengths_list for n in row]
        if flat_lengths and (min(flat_lengths) < 0 or max(flat_lengths) > min(max_kept, cached_len)):
            raise ValueError(
                f"lengths must lie in [0, min(max_kept={max_kept}, seq_len={cached_len})], "
                f"got values in [{min(flat_lengths)}, {max(flat_lengths)}]"
            )

        dense = all(len(set(row)) == 1 for row in lengths_list)
        heads_per_row = 1 if dense else kv_heads
        row_lengths = [row[0] if dense else sum(row) for row in lengths_list]
        groups = bucket_rows(row_lengths, padding_tolerance, max_buckets)
        device = keys.device
        lengths = lengths.to(device=device, dtype=torch.long)
        indices = indices.to(device=device, dtype=torch.long)
        flat_keys = keys.reshape(-1, head_dim)
        flat_values = values.reshape(-1, head_dim)
        buckets = []
        for group in groups:
            samples = torch.tensor(group, dtype=torch.long, device=device)
            n, rows = len(group), kv_heads // heads_per_row
            prompt_len = max(row_lengths[b] for b in group)
            head_lengths = lengths[samples].view(n, rows, heads_per_row)
            ends = head_lengths.cumsum(-1)
            starts = ends - head_lengths
            position = torch.arange(prompt_len, device=device).expand(n, rows, prompt_len).contiguous()
            found = torch.searchsorted(ends, position, right=True)
            # Row padding (found == heads_per_row) gathers a clamped real token, hidden by `owner`.
            in_row = found.clamp(max=heads_per_row - 1)
            offset = (position - starts.gather(-1, in_row)).clamp(0, max(max_kept - 1, 0))
            head = in_row + heads_per_row * torch.arange(rows, device=device).view(1, rows, 1)
            pair = samples.view(n, 1, 1) * kv_heads + head
            token = indices.view(-1, max_kept)[pair, offset]
            if token.numel() and (int(token.min()) < 0 or int(token.max()) >= cached_len):
                raise ValueError(f"kept indices must lie in [0, {cached_len}), the cached prompt length")
            source = (pair * cached_len + token).flatten()
            shape = (n, rows, prompt_len, head_dim)
            padded = any(row_lengths[b] < prompt_len for b in group)
            owner = None
            if heads_per_row > 1 or padded:
                owner = torch.where(found < heads_per_row, found, -1).to(_owner_dtype(heads_per_row))
            buckets.append(
                RowBucket(
                    samples=samples,
                    keys=flat_keys.index_select(0, source).view(shape),
                    values=flat_values.index_select(0, source).view(shape),
                    starts=starts,
                    ends=ends,
                    owner=owner,
                    heads_per_row=heads_per_row,
                    prompt_len=prompt_len,
                    max_length=max(flat_lengths[b * kv_heads + h] for b in group for h in range(kv_heads)),
                    padded=padded,
                    covers_batch=group == list(range(batch)),
                )
            )
        return cls(buckets, lengths.clone(), seq_len, head_dim, keys.dtype, device, reader=reader)

    # ----------------------------------------------------------------- sizes
    @property
    def batch_size(self) -> int:
        return self._prompt_lengths.shape[0]

    @property
    def kv_heads(self) -> int:
        """Number of KV heads."""
        return self._prompt_lengths.shape[1]

    @property
    def num_heads(self) -> int:
        """Deprecated name of :attr:`kv_heads` (these are KV heads, not query heads); removed in 0.2."""
        warnings.warn(
            "CompressedLayer.num_heads is renamed kv_heads (it counts KV heads); "
            "the old name will be removed in mmshiftkv 0.2",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.kv_heads

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """``(batch, kv_heads)`` int64: prompt tokens kept by each KV head (generated excluded)."""
        return self._prompt_lengths

    @property
    def dense(self) -> bool:
        """One bucket of dense rows covering the batch without padding (uniform budgets)."""
        return len(self.buckets) == 1 and self.buckets[0].heads_per_row == 1 and self.buckets[0].owner is None

    def _dense_bucket(self, what: str) -> RowBucket:
        if not self.dense:
            raise AttributeError(
                f"this CompressedLayer holds a different number of tokens per KV head (head-wise budgets or "
                f"samples of different lengths): it has no single {what} tensor; read layer.buckets"
            )
        return self.buckets[0]

    @property
    def keys(self) -> torch.Tensor:
        """``(batch, kv_heads, kept + generated, head_dim)`` for uniform layers (see the class docstring)."""
        return self._dense_bucket("keys").keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:
            self._dense_bucket("keys").keys = value

    @property
    def values(self) -> torch.Tensor:
        """``(batch, kv_heads, kept + generated, head_dim)`` for uniform layers (see the class docstring)."""
        return self._dense_bucket("values").values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            self._dense_bucket("values").values = value

    @property
    def nbytes(self) -> int:
        """Bytes held per token: keys and values (padding included) and the one-byte key owners.

        The bookkeeping tensors of a few integers per sample and KV head are not counted.
        """
        held = [
            tensor
            for bucket in self.buckets
            for tensor in (bucket.keys, bucket.values, bucket.owner)
            if tensor is not None
        ]
        return sum(tensor.untyped_storage().nbytes() for tensor in held)

    @property
    def ideal_nbytes(self) -> int:
        """Bytes of keys and values without any padding: kept prompt plus generated tokens per head."""
        tokens = int(self._prompt_lengths.sum()) + self.batch_size * self.kv_heads * self.generated_length
        return tokens * 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def get_seq_length(self) -> int:
        """Logical length: the original prompt length plus the generated tokens."""
        return self.original_length + self.generated_length

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        """Mask sizes in logical units, as for an uncompressed :class:`DynamicLayer`.

        ``query`` is the query length (transformers >= 5.13) or the query's ``cache_position``.
        """
        query_length = query if isinstance(query, int) else query.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        """No maximum: the layer grows with generated tokens."""
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    # ---------------------------------------------------------------- reader
    @property
    def reader(self) -> nn.Module | None:
        """The model whose compressed attention may read this layer; None: any model inside the context."""
        return None if self._reader is None else self._reader()

    def check_readable(self) -> None:
        """Raise ``RuntimeError`` unless this thread runs the compressed attention of :attr:`reader` now."""
        reading = reading_model()
        if self._reader is None:
            allowed = reading is not None or READING.contexts > 0
        else:
            allowed = reading is not None and reading is self._reader()
        if not allowed:
            raise RuntimeError(
                "a CompressedLayer can only be read by mmshiftkv's attention "
                "of the model it was compressed for: run that model inside `with press(model):` "
                "or `with mmshiftkv.cache.compressed_attention(model):`"
            )

    def __copy__(self) -> CompressedLayer:
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict) -> CompressedLayer:
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        state = {name: value for name, value in self.__dict__.items() if name != "_reader"}
        copied.__dict__.update(copy.deepcopy(state, memo))
        reader = self.reader
        # Copied together with its model (deepcopy((model, cache))): the copy belongs to the model's copy.
        copied._reader = self._reader if id(reader) not in memo else weakref.ref(memo[id(reader)])
        return copied

    def __getstate__(self) -> dict[str, Any]:
        # Pickled: the model object it belonged to does not exist where the layer is loaded.
        return {**self.__dict__, "_reader": None}

    # ---------------------------------------------------------------- update
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a CompressedLayer is built with CompressedLayer.from_selection, never lazily")

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens to every (batch, KV head).

        Parameters
        ----------
        key_states, value_states : torch.Tensor
            ``(batch, kv_heads, q_len, head_dim)``.
        *args, **kwargs
            Whatever else this transformers release passes to a layer's ``update`` (unused).

        Returns
        -------
        tuple of torch.Tensor
            The inputs, unchanged: the compressed attention reads the layer itself.
        """
        self.check_readable()
        batch, kv_heads, q_len, head_dim = key_states.shape
        if (batch, kv_heads, head_dim) != (self.batch_size, self.kv_heads, self.head_dim):
            raise ValueError(
                f"new states of shape {tuple(key_states.shape)} do not match the cache "
                f"(batch={self.batch_size}, kv_heads={self.kv_heads}, head_dim={self.head_dim})"
            )
        for bucket in self.buckets:
            bucket.keys = torch.cat([bucket.keys, self._to_rows(key_states, bucket)], dim=2)
            bucket.values = torch.cat([bucket.values, self._to_rows(value_states, bucket)], dim=2)
            if bucket.owner is not None:
                n, rows, _ = bucket.owner.shape
                new = torch.arange(bucket.heads_per_row, dtype=bucket.owner.dtype, device=bucket.owner.device)
                new = new.repeat(q_len).expand(n, rows, -1)
                bucket.owner = torch.cat([bucket.owner, new], dim=2)
        self.generated_length += q_len
        return key_states, value_states

    def _to_rows(self, states: torch.Tensor, bucket: RowBucket) -> torch.Tensor:
        """``(batch, kv_heads, q, d)`` -> ``(n, rows, q * heads_per_row, d)``, token-major."""
        if not bucket.covers_batch:
            states = states.index_select(0, bucket.samples)
        n, _, q_len, head_dim = states.shape
        rows = self.kv_heads // bucket.heads_per_row
        states = states.reshape(n, rows, bucket.heads_per_row, q_len, head_dim).transpose(2, 3)
        return states.reshape(n, rows, q_len * bucket.heads_per_row, head_dim)

    def crop(self, length: int) -> None:
        """Drop generated tokens, with the installed transformers' ``crop`` convention.

        A negative ``length`` removes that many tokens (every release); a positive one is the length to
        keep where transformers' own layers take a length (before 5.16) and is refused where they take
        the number of tokens to remove. 0 removes nothing there.

        Raises
        ------
        ValueError
            If the crop would reach into the compressed prompt, whose evicted tokens are gone.
        """
        self.check_crop(length)
        target = self._crop_target(length)
        if target >= self.get_seq_length():
            return
        kept = target - self.original_length
        for bucket in self.buckets:
            end = bucket.prompt_len + bucket.heads_per_row * kept
            # clone: a slice would keep the dropped tokens' storage alive.
            bucket.keys = bucket.keys[:, :, :end].clone()
            bucket.values = bucket.values[:, :, :end].clone()
            if bucket.owner is not None:
                bucket.owner = bucket.owner[:, :, :end].clone()
        self.generated_length = kept

    def _crop_target(self, length: int) -> int:
        if length < 0:
            return self.get_seq_length() + length
        if crop_takes_absolute_length():
            return length
        if length > 0:
            raise ValueError(
                f"crop({length}): this transformers' caches take the number of tokens to remove as a "
                "negative int"
            )
        return self.get_seq_length()

    def check_crop(self, length: int) -> None:
        """Raise ``ValueError`` if :meth:`crop` with ``length`` would cut into the compressed prompt."""
        target = self._crop_target(length)
        if target < self.original_length:
            raise ValueError(
                f"cannot crop a compressed cache to {target} tokens: its prompt part "
                f"({self.original_length} logical tokens) was compressed and cannot be cut"
            )

    # ------------------------------------------------------- batch selection
    def select_samples(self, new_to_old: torch.Tensor) -> None:
        """Rebuild the batch: new sample ``i`` is old sample ``new_to_old[i]`` (repeats allowed)."""
        new_to_old = new_to_old.to(device=self.device, dtype=torch.long)
        new_batch = new_to_old.shape[0]
        buckets = []
        for bucket in self.buckets:
            slot = torch.full((self.batch_size,), -1, dtype=torch.long, device=self.device)
            slot[bucket.samples] = torch.arange(bucket.samples.shape[0], device=self.device)
            taken = slot[new_to_old]
            samples = torch.nonzero(taken >= 0).flatten()
            if samples.numel() == 0:
                continue
            taken = taken[samples]
            bucket.samples = samples
            bucket.keys, bucket.values, bucket.starts, bucket.ends = (
                tensor.index_select(0, taken)
                for tensor in (bucket.keys, bucket.values, bucket.starts, bucket.ends)
            )
            if bucket.owner is not None:
                bucket.owner = bucket.owner.index_select(0, taken)
            bucket.covers_batch = samples.shape[0] == new_batch
            buckets.append(bucket)
        self.buckets = buckets
        self._prompt_lengths = self._prompt_lengths.index_select(0, new_to_old)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_samples(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = torch.nonzero(indices).flatten()
        self.select_samples(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_samples(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    # --------------------------------------------------------------- devices
    def offload(self) -> None:
        self._move(torch.device("cpu"))

    def prefetch(self) -> None:
        self._move(self.device)

    def _move(self, device: torch.device) -> None:
        for bucket in self.buckets:
            bucket.keys = bucket.keys.to(device, non_blocking=True)
            bucket.values = bucket.values.to(device, non_blocking=True)

    def reset(self) -> None:
        raise NotImplementedError("a CompressedLayer cannot be reset; build a new cache instead")

    def __repr__(self) -> str:
        return (
            f"CompressedLayer(batch={self.batch_size}, kv_heads={self.kv_heads}, "
            f"original_length={self.original_length}, generated={self.generated_length}, "
            f"buckets={len(self.buckets)})"
        )
