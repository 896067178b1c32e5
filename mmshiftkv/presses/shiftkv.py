"""MM-ShiftKV: decode-aware prefill-time KV selection with variance-expanded query proxies."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mmshiftkv import ops
from mmshiftkv.ops.reference import group_attention_mass
from mmshiftkv.presses.attention import last_query_attention
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.moments import Moments
from mmshiftkv.validation import check_bool, check_int, check_real

#: The budget used when neither ``budget`` nor ``compression_ratio`` is given: the paper's
#: tightest setting (Table 1), 64 prompt tokens per KV head.
DEFAULT_BUDGET = 64


def weight_fingerprint(weight: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """``W probe``, ``(out,)`` float32, of an ``(out, in)`` weight and a fixed random probe.

    One pass over the weight, no copy of it (a float32 reduction of a bfloat16 weight would first
    widen all of it, ten times the cost on a CPU), summed in a fixed order
    (:func:`mmshiftkv.ops.weight_products`): an unchanged weight gives the same bits at every call.
    A change of the weight goes unseen only if it keeps every row's product with the probe to
    float32 rounding. :meth:`ShiftKVPress.score` takes it in the same pass as the last prompt query.
    """
    return ops.weight_products(weight, probe[None])[0]


def _seeded(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class _ProjectedNoise:
    """One layer's ``(W 1, W z)``, with what they were computed from (see ``ShiftKVPress.proxy_queries``)."""

    tag: tuple
    #: ``(hidden,)`` random direction in the weight's dtype, and ``W probe`` (float32) of the weight used.
    probe: torch.Tensor
    weighted: torch.Tensor | None
    #: ``W 1`` accumulated in float32, and ``W z`` in the weight's dtype (None until first projected).
    row_sums: torch.Tensor | None
    projected: torch.Tensor | None


@dataclass(kw_only=True)
class ShiftKVPress(BudgetedPress):
    """MM-ShiftKV (ACL 2026 Findings, Sec. 3.2, Alg. 1, App. B).

    Per layer, at the end of prefill:

    1. statistics of the attention input (the hidden states after the input norm) over the real
       prompt tokens (``statistics``);
    2. ``n_proxies`` proxy hidden states ``h ~ N(mu, diag((gamma * sigma)^2))`` (Eq. 5), drawn from
       a private generator seeded by ``seed`` and the layer index (the user's RNG is untouched; a
       sample's proxies do not depend on the rest of its batch);
    3. query proxies ``q = q_proj(h)`` (+ q-norm where the model has one, Eq. 6), rotated with the
       model's RoPE / M-RoPE at synthetic future positions ``next + position_start +
       position_stride * (i mod g)``, where ``next = max(prompt positions) + 1`` is the true first
       decode position (Qwen2-VL's ``rope_deltas`` included) and ``g = n_proxies / n_groups``;
    4. softmax attention of each proxy over the prompt keys with the model's scaling (Eq. 7),
       averaged over the query heads of a KV head; per group of ``g`` consecutive proxies the mass
       is summed (Eq. 8) and the keys covering ``tau`` of it get one vote each (Eq. 9-10);
    5. ``score = votes + anchor_weight * a(q_last)``, the attention of the real last prompt query;
       the base class keeps the last prompt token plus the top ``budget - 1`` and restores temporal
       order.

    Under a chunked prefill the statistics are merged chunk by chunk
    (:class:`~mmshiftkv.presses.moments.Moments`, the same algorithm as in one forward) and only the
    last query's attention input (the last ``stats_window`` ones with a window) is kept across chunks.

    Scoring runs in the compiled op :func:`mmshiftkv.ops.shiftkv_scores` (float32 softmax and
    masses whatever the model dtype, O(G * T) extra memory per KV head), falling back to the
    pure-torch reference when the extension is not built.

    Defaults follow the paper's equations, with one deliberate exception: ``statistics="global"``
    (one scalar mean and std over all prompt tokens and features) because that is what the authors'
    released code ran to produce every published table; ``statistics="per_feature"`` is Eq. 4 as
    written. :meth:`reference` reproduces the released code's remaining details.

    Parameters
    ----------
    budget : int, optional
        Prompt tokens kept per KV head (last token included). Default 64 (:data:`DEFAULT_BUDGET`)
        when neither ``compression_ratio`` nor ``allocator`` is given (an allocator needs an explicit
        budget, as for every press).
    gamma : float, default=10.0
        Variance expansion factor (``gamma=1``: sampling without expansion, Table 5).
    tau : float, default=0.95
        Mass each group's voted key set must cover, in (0, 1].
    n_proxies : int, default=512
        Number of query proxies N.
    n_groups : int, default=32
        Number of voting groups G (``n_proxies`` must be divisible by it).
    anchor_weight : float, default=1.0
        Weight lambda of the last prompt query's attention.
    statistics : {"global", "per_feature"}, default="global"
        Scalar mean/std over tokens x features (released code) or per-feature mean/std (Eq. 4).
    stats_window : int, optional
        Compute the statistics over the last ``stats_window`` real tokens only (App. B mentions a
        recent window of 512); default: the whole prompt.
    position_start, position_stride : int, default=0, 32
        Future position of proxy ``i``: ``next + position_start + position_stride * (i mod g)``.
    coverage : {"smallest", "within"}, default="smallest"
        ``"smallest"``: the smallest key set whose mass reaches ``tau`` (Eq. 9). ``"within"``: the
        largest prefix whose mass stays <= ``tau`` (released code).
    anchor_in_groups : bool, default=False
        Add the last query's attention into every group's mass, divided by ``g + 1`` (released code).
    exclude_last_key : bool, default=False
        Drop the last key from masses and votes after the softmax (released code; it is kept anyway).
    sampling : bool, default=True
        False ranks by the last query's attention only (Table 5 "w/o sampling", = LastAttn).
    voting : bool, default=True
        False ranks by the summed proxy mass instead of votes (Table 5 "w/o group voting").
    seed : int, default=0
        Seed of the proxy generator.
    backend : {"auto", "compiled", "torch"}, default="auto"
        Scoring backend passed to :func:`mmshiftkv.ops.shiftkv_scores`.
    """

    chunked_prefill_refusal: ClassVar[str | None] = None

    budget: int | None = None
    gamma: float = 10.0
    tau: float = 0.95
    n_proxies: int = 512
    n_groups: int = 32
    anchor_weight: float = 1.0
    statistics: Literal["global", "per_feature"] = "global"
    stats_window: int | None = None
    position_start: int = 0
    position_stride: int = 32
    coverage: Literal["smallest", "within"] = "smallest"
    anchor_in_groups: bool = False
    exclude_last_key: bool = False
    sampling: bool = True
    voting: bool = True
    seed: int = 0
    backend: Literal["auto", "compiled", "torch"] = "auto"

    def __post_init__(self) -> None:
        # The default budget stands in for a missing budget only without an allocator: an allocator
        # distributes a budget the caller chose, as for every other press.
        if self.budget is None and self.compression_ratio == 0 and self.allocator is None:
            self.budget = DEFAULT_BUDGET
        super().__post_init__()
        for name in ("gamma", "tau", "anchor_weight"):
            check_real(getattr(self, name), name)
        for name in ("n_proxies", "n_groups"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("position_start", "position_stride"):
            check_int(getattr(self, name), name, minimum=0)
        check_int(self.seed, "seed")
        if self.stats_window is not None:
            check_int(self.stats_window, "stats_window", minimum=2)
        for name in ("anchor_in_groups", "exclude_last_key", "sampling", "voting"):
            check_bool(getattr(self, name), name)
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.n_proxies % self.n_groups:
            raise ValueError(
                f"n_proxies ({self.n_proxies}) must be a positive multiple of n_groups ({self.n_groups})"
            )
        if self.statistics not in ("global", "per_feature"):
            raise ValueError(f"statistics must be 'global' or 'per_feature', got {self.statistics!r}")
        if self.coverage not in ("smallest", "within"):
            raise ValueError(f"coverage must be 'smallest' or 'within', got {self.coverage!r}")
        if self.backend not in ("auto", "compiled", "torch"):
            raise ValueError(f"backend must be 'auto', 'compiled' or 'torch', got {self.backend!r}")
        # Wz of each layer's query projection, keyed by the projection module (see proxy_queries).
        self._noise_projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        # The cached projections belong to this process's weights: a pickled or copied press starts empty.
        return {name: value for name, value in self.__dict__.items() if name != "_noise_projections"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._noise_projections = weakref.WeakKeyDictionary()

    @classmethod
    def reference(cls, **overrides) -> ShiftKVPress:
        """The authors' released implementation (Qwen2.5-VL path) as a preset.

        Global scalar statistics, future positions ``last + 32k`` for ``k = 1..16`` in every group,
        the last query's attention inside each group's mass (divided by ``g + 1``), the last key
        dropped after the softmax, and ``searchsorted(cumsum, tau * total, right=True)`` coverage.
        Any field can be overridden, e.g. ``ShiftKVPress.reference(budget=128)``.
        """
        preset = dict(
            statistics="global",
            position_start=31,
            position_stride=32,
            coverage="within",
            anchor_in_groups=True,
            exclude_last_key=True,
        )
        return cls(**{**preset, **overrides})

    @property
    def group_size(self) -> int:
        return self.n_proxies // self.n_groups

    def proxy_hidden_states(
        self,
        hidden_states: torch.Tensor,
        layer_idx: int,
        key_mask: torch.Tensor | None = None,
        moments: Moments | None = None,
    ) -> torch.Tensor:
        """Variance-expanded proxy hidden states (Eq. 4-5).

        Parameters
        ----------
        hidden_states : torch.Tensor
            Attention input of the prompt, ``(batch, seq_len, hidden)``.
        layer_idx : int
            Layer index, part of the proxy generator's seed.
        key_mask : torch.Tensor, optional
            ``(batch, seq_len)`` bool, True for real tokens; padding stays out of the statistics.
        moments : Moments, optional
            The prompt's statistics when already gathered (a chunked prefill); ``hidden_states`` then
            only give the dtype and device.

        Returns
        -------
        torch.Tensor
            ``(batch, n_proxies, hidden)`` in the dtype of ``hidden_states``. The standard noise is
            shared by the samples of a batch, so a sample's proxies do not depend on its batch.
        """
        if moments is None:
            moments = self.prompt_moments(hidden_states, key_mask)
        mean, std = moments.mean_and_std()
        noise = self.standard_noise(layer_idx, hidden_states.shape[-1], hidden_states.device)
        proxies = mean[:, None, :] + self.gamma * std[:, None, :] * noise[None]
        return proxies.to(hidden_states.dtype)

    def proxy_queries(
        self,
        adapter,
        module: nn.Module,
        hidden_states: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        moments: Moments | None = None,
    ) -> torch.Tensor:
        """Pre-RoPE query proxies ``q_proj(h)`` (+ q-norm) of :meth:`proxy_hidden_states` (Eq. 6).

        With global statistics a proxy is ``mean + gamma * std * z`` with the layer's fixed noise
        ``z``, so an affine ``q_proj`` maps it to ``mean * W1 + gamma * std * Wz + b``: ``Wz`` (a
        ``n_proxies x hidden x q_out`` GEMM that does not depend on the prompt) is computed once
        per layer and kept on the press, ``n_proxies x q_out`` floats in the model dtype per layer
        (3.7 MB per layer, 103 MB in all, for Qwen2.5-VL-7B in bfloat16). The result equals the
        direct projection up to rounding (the direct one rounds each proxy to the model dtype
        before the GEMM). A changed ``q_proj`` weight (in place, through ``.data`` as PEFT merges
        write, or a new tensor) is noticed at the next prefill by its fingerprint
        (:func:`weight_fingerprint`: its float32 product with a fixed random vector, summed in a
        fixed order, ``benchmarks/bench_fingerprint.py``). :meth:`score` takes it in the same pass
        over the weight as the last prompt query's projection, which it needs anyway: both cost
        about 3.8 ms in float32 and 2.2 ms in bfloat16 for Qwen2.5-VL-7B's q_proj on one CPU
        thread (AVX-512), against 3.5 + 3.9 ms and 3.1 + 3.9 ms as two ATen products.
        Unseen is only a change that keeps every row's product with the vector to float32
        rounding (then the proxies move by rounding, as a fresh projection's would) or a
        rearrangement within a row that keeps it.

        Returns
        -------
        torch.Tensor
            ``(batch, heads, n_proxies, head_dim)``.
        """
        if moments is None:
            moments = self.prompt_moments(hidden_states, key_mask)
        return self._proxy_queries(adapter, module, hidden_states, moments).to(hidden_states.dtype)

    def _affine_projection(self, adapter, module: nn.Module) -> nn.Linear | None:
        """The layer's ``q_proj`` where the proxies are projected through ``(W 1, W z)``, else None."""
        return adapter.query_projection(module) if self.statistics == "global" else None

    def _proxy_queries(
        self, adapter, module: nn.Module, hidden_states: torch.Tensor, moments: Moments
    ) -> torch.Tensor:
        """:meth:`proxy_queries`, float32 where projected through ``(W 1, W z)`` (model dtype otherwise)."""
        projection = self._affine_projection(adapter, module)
        if projection is None:
            proxy_states = self.proxy_hidden_states(hidden_states, module.layer_idx, moments=moments)
            return adapter.query_states(module, proxy_states)
        noise, _ = self._projected_noise(projection, module.layer_idx)
        offset, scale = self._proxy_affine(projection, noise, moments)
        projected = torch.addcmul(offset[:, None], scale[:, None, None], noise.projected)  # float32
        return adapter.query_heads(module, projected)

    def _proxy_affine(
        self, projection: nn.Linear, noise: _ProjectedNoise, moments: Moments
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offset, scale)`` of the proxies' ``q_proj`` outputs ``offset + scale * W z``, float32.

        ``offset = mean * W 1 + b``, ``(batch, q_out)``, is their common part; ``scale = gamma * std``,
        ``(batch,)``.
        """
        mean, std = moments.mean_and_std()  # (batch, 1) each
        offset = mean * noise.row_sums
        if projection.bias is not None:
            offset = offset + projection.bias.float()
        return offset, self.gamma * std[:, 0]

    def _projected_noise(
        self, projection: nn.Linear, layer_idx: int, inputs: torch.Tensor | None = None
    ) -> tuple[_ProjectedNoise, torch.Tensor | None]:
        """The layer's ``(W 1, W z)``, checked by the weight's fingerprint, and ``inputs @ W.T``.

        ``inputs``: ``(n, hidden)`` vectors multiplied by the weight in the fingerprint's pass over
        it (:func:`mmshiftkv.ops.weight_products`), their products returned ``(n, q_out)`` float32
        (None without inputs).
        """
        weight = projection.weight
        tag = (weight.device, weight.dtype, tuple(weight.shape), layer_idx, self.seed, self.n_proxies)
        cached = self._noise_projections.get(projection)
        with torch.no_grad():
            if cached is None or cached.tag != tag:
                probe = torch.randn(
                    weight.shape[1], generator=_seeded(weight.device, layer_idx), device=weight.device
                )
                cached = _ProjectedNoise(tag, probe.to(weight.dtype), None, None, None)
            vectors = (
                cached.probe[None]
                if inputs is None
                else torch.cat([cached.probe[None], inputs.to(weight.dtype)])
            )
            products = ops.weight_products(weight, vectors)
            fingerprint = products[0]
            if cached.weighted is None or not torch.equal(fingerprint, cached.weighted):
                noise = self.standard_noise(layer_idx, weight.shape[1], weight.device).to(weight.dtype)
                projected = nn.functional.linear(noise, weight)
                cached = _ProjectedNoise(
                    tag, cached.probe, fingerprint, weight.sum(1, dtype=torch.float32), projected
                )
                self._noise_projections[projection] = cached
        return cached, None if inputs is None else products[1:]

    def standard_noise(self, layer_idx: int, hidden: int, device: torch.device) -> torch.Tensor:
        """The layer's fixed standard-normal draws ``z``, ``(n_proxies, hidden)`` float32.

        From a private generator seeded by ``seed`` and ``layer_idx``: the user's RNG is untouched.
        """
        generator = _seeded(device, self.seed * 100_003 + layer_idx)
        return torch.randn(self.n_proxies, hidden, generator=generator, device=device)

    def prompt_statistics(
        self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the real prompt tokens' attention input (Eq. 4), float32.

        ``(batch, 1)`` each for ``statistics="global"``, ``(batch, hidden)`` for ``"per_feature"``;
        ``stats_window`` restricts them to each sample's last real tokens.
        """
        return self.prompt_moments(hidden_states, key_mask).mean_and_std()

    def prompt_moments(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None = None) -> Moments:
        """:class:`Moments` of :meth:`prompt_statistics` (mergeable across prefill chunks)."""
        real = key_mask
        if self.stats_window is not None:
            if real is None:
                real = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            from_end = real.flip(-1).long().cumsum(-1).flip(-1)
            real = real & (from_end <= self.stats_window)
        per_feature = self.statistics != "global"
        counts, means, variances = [], [], []
        for sample, states in enumerate(hidden_states):
            keep = None if real is None else real[sample]
            # Padding rows are left out by indexing (a copy of the real rows only where a sample has padding).
            rows = states if keep is None or bool(keep.all()) else states[keep]
            mean, variance = self._moments(rows)
            counts.append(rows.shape[0] if per_feature else rows.numel())
            means.append(mean)
            variances.append(variance)
        return Moments.of_mean_variance(
            torch.tensor(counts, device=hidden_states.device), torch.stack(means), torch.stack(variances)
        )

    def _moments(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance of ``(tokens, hidden)`` states, float32 (:func:`ops.prompt_moments`)."""
        return ops.prompt_moments(states, per_feature=self.statistics != "global")

    @property
    def prefill_rows(self) -> int:
        """The last query's attention input, or the ``stats_window`` last ones the statistics cover."""
        return self.stats_window if self.sampling and self.stats_window is not None else 1

    def accumulate_chunk(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        real: torch.Tensor,
        keys: torch.Tensor | None,
        previous: Moments | None,
    ) -> Moments | None:
        """The running statistics of the whole prompt (a window's come from the kept rows instead)."""
        if not self.sampling or self.stats_window is not None:
            return None
        moments = Moments.of(hidden_states, real, pooled=self.statistics == "global")
        return moments if previous is None else previous.merge(moments)

    def _layer_moments(self, module: nn.Module, hidden_states: torch.Tensor) -> Moments:
        accumulated: Any = self.state.accumulated(module)
        if accumulated is not None:
            return accumulated
        key_mask = self.state.key_mask
        if key_mask is not None:
            # The rows given may be a chunked prefill's last ones: their padding is the mask's end.
            key_mask = key_mask[:, -hidden_states.shape[1] :]
        return self.prompt_moments(hidden_states, key_mask)

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
        adapter = state.adapter
        if not self.sampling:
            return last_query_attention(state, module, hidden_states, keys)

        moments = self._layer_moments(module, hidden_states)
        projection = self._affine_projection(adapter, module)
        if projection is None:
            last_query = adapter.query_states(module, hidden_states[:, -1:])
            noise = None
        else:
            # One pass over q_proj's weight: its fingerprint (is the kept W z current?) and the last query.
            noise, last_projected = self._projected_noise(projection, module.layer_idx, hidden_states[:, -1])
            if projection.bias is not None:
                last_projected = last_projected + projection.bias.float()
            last_query = adapter.query_heads(module, last_projected[:, None].to(hidden_states.dtype))
        last_query = adapter.apply_rope(last_query, state.positions[..., -1:], module)[:, :, 0]
        # One group's future positions: proxy i is at offsets[i % group_size].
        offsets = self.position_start + self.position_stride * torch.arange(
            self.group_size, device=keys.device
        )
        positions = adapter.future_positions(state.positions, offsets)
        if projection is None:
            proxies = self._proxy_queries(adapter, module, hidden_states, moments)
            tiled = positions.repeat(*([1] * (positions.dim() - 1)), self.n_groups)
            proxies = adapter.apply_rope(proxies, tiled, module).to(hidden_states.dtype)
        else:
            # float32 proxies through (W 1, W z) are rotated in float32 and rounded to the model dtype once.
            offset, scale = self._proxy_affine(projection, noise, moments)
            proxies = adapter.rotated_affine_queries(
                module, noise.projected, offset, scale, positions, hidden_states.dtype
            )
        options = dict(
            n_groups=self.n_groups,
            scaling=module.scaling,
            key_mask=state.key_mask,
            anchor_in_groups=self.anchor_in_groups,
            exclude_last_key=self.exclude_last_key,
        )
        if self.voting:
            return ops.shiftkv_scores(
                proxies,
                keys,
                last_query,
                tau=self.tau,
                anchor_weight=self.anchor_weight,
                coverage=self.coverage,
                backend=self.backend,
                **options,
            )
        mass, anchor = group_attention_mass(proxies, keys, last_query, **options)
        return mass.sum(2) + self.anchor_weight * anchor
