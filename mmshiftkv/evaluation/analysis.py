"""The prefill-decode shift (paper Fig. 1): hidden-state statistics and decode attention coverage.

* :func:`hidden_state_shift` (Fig. 1a): per layer, the mean and standard deviation of the attention
  input (hidden states after the input norm) over the prompt during prefill and over the generated
  tokens during decoding.
* :func:`attention_coverage` (Fig. 1b): for each decode step of a FullKV generation, the fraction
  of the attention the decode query pays to the prompt that falls on the prompt tokens a press kept.
  FullKV keeps everything, so its coverage is exactly 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from mmshiftkv.cache.compat import cache_argument
from mmshiftkv.models.adapter import get_adapter
from mmshiftkv.presses.base import BudgetedPress


@dataclass
class LayerShift:
    """Attention-input statistics of one layer, in prefill and in decoding."""

    layer: int
    prefill_mean: float
    prefill_std: float
    decode_mean: float
    decode_std: float

    @property
    def std_ratio(self) -> float:
        """decode std / prefill std: > 1 means decoding spreads wider than the prompt did."""
        return self.decode_std / self.prefill_std if self.prefill_std else float("nan")


@dataclass
class Coverage:
    """Attention coverage of one press.

    Attributes
    ----------
    per_step : torch.Tensor
        ``(steps, layers, batch, kv_heads)`` kept share of the decode query's prompt attention
        (averaged over the query heads of a KV head).
    """

    per_step: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def mean(self) -> float:
        return float(self.per_step.mean())

    def per_layer(self) -> list[float]:
        return self.per_step.transpose(0, 1).flatten(1).mean(-1).tolist()


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run ``model`` with eager attention (so attention weights are returned), then restore."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def hidden_state_shift(model: PreTrainedModel, inputs: dict, max_new_tokens: int = 32) -> list[LayerShift]:
    """Per-layer mean/std of the attention input over prompt tokens (prefill) vs generated tokens.

    Statistics run over real tokens and all features (padding excluded), like the scalar
    statistics of the paper's Fig. 1a. Greedy decoding with the full cache.
    """
    adapter = get_adapter(model)
    prefill: dict[int, list[torch.Tensor]] = {}
    decode: dict[int, list[torch.Tensor]] = {}
    real = inputs.get("attention_mask")

    def capture(module, args, kwargs):
        states = kwargs["hidden_states"].float()
        if states.shape[1] > 1:
            mask = real.bool() if real is not None else torch.ones(states.shape[:2], dtype=torch.bool)
            prefill.setdefault(module.layer_idx, []).append(states[mask.to(states.device)])
        else:
            decode.setdefault(module.layer_idx, []).append(states.flatten(0, 1))

    hooks = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in adapter.attention_modules]
    try:
        with torch.no_grad():
            model.generate(
                **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
            )
    finally:
        for hook in hooks:
            hook.remove()
    shifts = []
    for layer in range(adapter.n_layers):
        before, after = torch.cat(prefill[layer]), torch.cat(decode[layer])
        shifts.append(
            LayerShift(
                layer, float(before.mean()), float(before.std()), float(after.mean()), float(after.std())
            )
        )
    return shifts


def kept_mask(press: BudgetedPress, layer: int, seq_len: int) -> torch.Tensor | None:
    """``(batch, kv_heads, seq_len)`` bool of the prompt tokens ``press`` kept in ``layer``."""
    indices = press.stats.indices[layer]
    if indices is None:
        return None
    lengths = press.stats.kept[layer]
    valid = torch.arange(indices.shape[-1]) < lengths[..., None]
    mask = torch.zeros(*indices.shape[:2], seq_len, dtype=torch.bool)
    return mask.scatter_(-1, indices, valid)


def attention_coverage(
    model: PreTrainedModel, inputs: dict, press: BudgetedPress, max_new_tokens: int = 32
) -> Coverage:
    """Share of each decode step's prompt attention that falls on the tokens ``press`` keeps.

    The press compresses a prefill of ``inputs`` (its selection is read from ``press.stats``); a
    separate greedy FullKV generation provides the decode queries and their attention over the
    whole prompt. Layers the press left uncompressed count as fully covered.
    """
    adapter = get_adapter(model)
    seq_len = inputs["input_ids"].shape[1]
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, DynamicCache()))
    masks = [kept_mask(press, layer, seq_len) for layer in range(adapter.n_layers)]

    with eager_attention(model), torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    steps = []
    for step_attentions in output.attentions[1:]:  # the first entry is the prefill itself
        layers = []
        for layer, probs in enumerate(step_attentions):
            prompt = probs[:, :, -1, :seq_len].float().cpu()
            prompt = prompt.view(prompt.shape[0], adapter.n_kv_heads, -1, seq_len)
            total = prompt.sum(-1)
            kept = total if masks[layer] is None else (prompt * masks[layer][:, :, None, :]).sum(-1)
            layers.append((kept / total).mean(-1))
        steps.append(torch.stack(layers))
    return Coverage(per_step=torch.stack(steps))
