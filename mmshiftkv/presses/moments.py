"""Mergeable mean and (co)variance of prompt rows: one-shot and chunked prefills share one algorithm.

:class:`Moments` holds per sample the count, mean and sum of squared deviations (``M2``) of some
rows; two of them merge exactly by Chan, Golub and LeVeque's pairwise update (1979), so moments
of a prompt that arrives in chunks equal those of the whole prompt up to float64 rounding. Rows are
read in pieces of :data:`PIECE_ELEMENTS`, each converted once and summed two-pass (mean, then
deviations) in float64, so no prompt-sized temporary is made and a far-off first piece costs the
variance no precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Values per piece of the statistics' pass: bounds its float64 temporaries to 8 MB each in few
#: enough ops that per-op overhead stays small against the prompt's size.
PIECE_ELEMENTS = 1 << 20


@dataclass
class Moments:
    """Count, mean and ``M2`` of the real rows of each sample.

    Attributes
    ----------
    count : torch.Tensor
        ``(batch,)`` float64, values summed per feature (rows, or rows x features when pooled).
    mean : torch.Tensor
        ``(batch, *features)`` float64.
    m2 : torch.Tensor
        ``(batch, *features)`` float64 sums of squared deviations from the mean, or
        ``(batch, *features, d)`` sums of outer products of the deviations over the last feature axis
        (``covariance=True``).
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(
        cls,
        values: torch.Tensor,
        real: torch.Tensor | None = None,
        *,
        pooled: bool = False,
        covariance: bool = False,
    ) -> Moments:
        """Moments of the rows of ``values`` ``(batch, n, *features)`` where ``real`` ``(batch, n)`` is True.

        ``pooled``: one scalar over rows x features (``mean`` ``(batch, 1)``). ``covariance``: ``m2``
        holds outer products over the last feature axis (computed in float32 GEMMs, summed in
        float64). Rows outside ``real`` are left out, whatever they hold (NaN included).
        """
        batch, n = values.shape[:2]
        features = values[0, 0].numel() if n else max(1, values[0].numel())
        rows = max(1, PIECE_ELEMENTS // max(features, 1))
        total: Moments | None = None
        for start in range(0, n, rows):
            keep = None if real is None else real[:, start : start + rows]
            piece = cls._of_piece(values[:, start : start + rows], keep, pooled, covariance)
            total = piece if total is None else total.merge(piece)
        if total is None:
            shape = (batch, 1) if pooled else (batch, *values.shape[2:])
            zeros = values.new_zeros(shape, dtype=torch.float64)
            m2 = zeros[..., None].expand(*shape, shape[-1]).clone() if covariance else zeros.clone()
            total = cls(values.new_zeros(batch, dtype=torch.float64), zeros, m2)
        return total

    @classmethod
    def of_mean_variance(cls, count: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> Moments:
        """Moments from counts ``(batch,)``, means and unbiased variances ``(batch, *features)``."""
        count = count.double()
        shape = (-1, *([1] * (mean.dim() - 1)))
        m2 = variance.double() * (count - 1).clamp(min=0).view(shape)
        return cls(count, mean.double(), m2)

    @classmethod
    def _of_piece(
        cls, values: torch.Tensor, real: torch.Tensor | None, pooled: bool, covariance: bool
    ) -> Moments:
        batch, n = values.shape[:2]
        feature_axes = values.dim() - 2
        if pooled:
            values = values.reshape(batch, -1, 1)
            if real is not None:
                real = real[:, :, None].expand(-1, -1, values.shape[1] // n).reshape(batch, -1)
            feature_axes = 1
        x = values.double()
        if real is None:
            count = x.new_full((batch,), float(x.shape[1]))
            mean = x.mean(1)
            deviations = x - mean[:, None]
        else:
            keep = real.view(batch, x.shape[1], *([1] * feature_axes))
            x = torch.where(keep, x, 0.0)
            count = real.sum(1).double()
            mean = x.sum(1) / count.clamp(min=1).view(batch, *([1] * feature_axes))
            deviations = torch.where(keep, x - mean[:, None], 0.0)
        if covariance:
            small = deviations.float()
            m2 = torch.einsum("bn...i,bn...j->b...ij", small, small).double()
        else:
            m2 = deviations.square_().sum(1)
        return cls(count, mean, m2)

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of rows (Chan et al.'s pairwise update)."""
        count = self.count + other.count
        shape = (-1, *([1] * (self.mean.dim() - 1)))
        share = (other.count / count.clamp(min=1)).view(shape)
        delta = other.mean - self.mean
        mean = self.mean + delta * share
        weight = self.count.view(shape) * share  # n_a * n_b / n
        if self.m2.dim() > self.mean.dim():
            spread = delta[..., :, None] * delta[..., None, :] * weight[..., None]
        else:
            spread = delta.square() * weight
        return Moments(count, mean, self.m2 + other.m2 + spread)

    def mean_and_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased standard deviation in float32, ``(batch, *features)`` each."""
        shape = (-1, *([1] * (self.mean.dim() - 1)))
        variance = self.m2 / (self.count - 1).clamp(min=1).view(shape)
        return self.mean.float(), variance.clamp(min=0).sqrt().float()
