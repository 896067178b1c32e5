"""Mean and variance of a prompt's attention input (ShiftKV's Eq. 4), in one pass over the states."""

from __future__ import annotations

import torch

from mmshiftkv.ops.checks import SCORING_DTYPES
from mmshiftkv.ops.compiled import runs_on

#: float32 elements per chunk of the torch path: each chunk is converted to float32 once.
STATS_CHUNK_ELEMENTS = 1 << 20


def prompt_moments(states: torch.Tensor, *, per_feature: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of ``(tokens, hidden)`` states, float32.

    Over every element (``(1,)`` each) or per feature (``(hidden,)`` each). Both paths sum
    deviations from the first tokens' mean (the shifted-data algorithm), so a prompt whose mean is
    far from zero keeps its variance's precision and no prompt-sized temporary is made: on the CPU
    the compiled op reads each state once and sums in float64; elsewhere (or without the extension)
    torch sums float32 chunks of :data:`STATS_CHUNK_ELEMENTS`, shifted by the first chunk's mean.

    Parameters
    ----------
    states : torch.Tensor
        ``(tokens, hidden)`` float16, bfloat16 or float32, at least one token.
    per_feature : bool
        One mean and variance per hidden feature instead of one over all elements.

    Returns
    -------
    tuple of torch.Tensor
        ``(mean, variance)``, float32, ``(1,)`` or ``(hidden,)`` each; a single token's variance is 0.
    """
    if states.dim() != 2 or states.shape[0] == 0 or states.shape[1] == 0:
        raise ValueError(f"states must be a non-empty (tokens, hidden) matrix, got {tuple(states.shape)}")
    if states.dtype not in SCORING_DTYPES:
        raise TypeError(f"states must be float16, bfloat16 or float32, got {states.dtype}")
    if states.device.type == "cpu" and runs_on(states.device):
        mean, variance = torch.ops.mmshiftkv.prompt_moments(states.detach(), per_feature)
        return mean, variance
    dims = 0 if per_feature else None
    count = states.shape[0] if per_feature else states.numel()
    chunks = states.detach().split(max(1, STATS_CHUNK_ELEMENTS // states.shape[-1]))
    shift = chunks[0].float().mean(dim=dims)
    first = second = 0
    for chunk in chunks:
        deviations = chunk.float() - shift
        first = first + deviations.sum(dim=dims)
        second = second + deviations.square_().sum(dim=dims)
    mean = shift + first / count
    variance = (second - first * first / count) / max(count - 1, 1)
    return mean.reshape(-1), variance.clamp(min=0).reshape(-1)
