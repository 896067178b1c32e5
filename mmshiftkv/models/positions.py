"""The M-RoPE positions a Qwen-VL-style model gives a processor batch, on every transformers release."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn


def rope_index(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model.model.get_rope_index`` called by keyword, ``(3, batch, seq_len)``.

    transformers 5.3 inserted ``mm_token_type_ids`` as its second positional parameter; every
    argument the installed signature names is taken from ``inputs`` by its name.
    """
    get_rope_index = model.model.get_rope_index
    names = inspect.signature(get_rope_index).parameters
    arguments = {name: inputs[name] for name in names if name in inputs}
    positions, _ = get_rope_index(**arguments)
    return positions
