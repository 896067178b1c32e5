"""The prefill-decode shift (paper Fig. 1): hidden-state statistics and decode attention coverage.

* :func:`hidden_state_shift` (Fig. 1a): per layer, the mean and standard deviation of the attention
  input (hidden states after the input norm) over the prompt during prefill and over the generated
  tokens during decoding.
* :func:`attention_coverage` (Fig. 1b): for each decode step of a FullKV generation, the fraction
  of the attention the decode query pays to the prompt that falls on the prompt tokens a press kept.
  FullKV keeps everything, so its coverage is exactly 1.
* :func:`analyze_samples` (``mmshiftkv analyze``): both over several prompts, averaged, for
  several presses; the prompts are :func:`synthetic_conversations` or a task's
  (:func:`task_conversations`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from mmshiftkv.cache.compat import prompt_cache_argument
from mmshiftkv.evaluation.config import load_task_split
from mmshiftkv.evaluation.tasks import get_task
from mmshiftkv.generation import encode_messages, user_turn
from mmshiftkv.models.adapter import get_adapter
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.registry import make_press


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
        model(**inputs, **prompt_cache_argument(model), use_cache=True)
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


SYNTHETIC_QUESTION = "What is written in the picture? Describe every detail you can read."


def synthetic_conversations(n: int, image_size: int = 448, seed: int = 0) -> list[list[dict]]:
    """``n`` one-turn conversations: a seeded noise image with a few flat boxes, and a question."""
    conversations = []
    for i in range(n):
        rng = np.random.RandomState(seed + i)
        pixels = (rng.rand(image_size, image_size, 3) * 255).astype("uint8")
        for _ in range(4):
            x, y = rng.randint(0, max(image_size - image_size // 4, 1), size=2)
            pixels[y : y + image_size // 4, x : x + image_size // 4] = rng.randint(0, 255, size=3)
        conversations.append(user_turn(SYNTHETIC_QUESTION, image=Image.fromarray(pixels)))
    return conversations


def task_conversations(
    task: str, n: int, dataset_org: str | None = None, cache_dir: str | None = None, **overrides: Any
) -> list[list[dict]]:
    """The prompts (chat messages) of the first ``n`` samples of a task."""
    spec = get_task(task, dataset_org=dataset_org, **overrides)
    return [spec.build_messages(row) for row in load_task_split(task, spec, n, cache_dir)]


def analyze_samples(
    model: PreTrainedModel,
    processor: Any,
    conversations: Sequence[list[dict]],
    presses: Sequence[str],
    budget: int,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Fig. 1 over several prompts, one at a time.

    Returns
    -------
    dict
        ``hidden_state_shift``: per layer, the prefill/decode mean and std of the attention input
        (:func:`hidden_state_shift`), averaged over the samples.
        ``coverage``: per press, ``distribution`` (one value per sample and decode step: the
        coverage averaged over layers and KV heads), its ``mean`` and population ``std``,
        ``per_layer`` and ``per_sample`` means
        (:func:`attention_coverage`).
    """
    if not conversations:
        raise ValueError("analyze_samples needs at least one conversation (conversations is empty)")
    shifts: list[list[Any]] = []
    per_step: dict[str, list[torch.Tensor]] = {name: [] for name in presses}
    for conversation in tqdm(conversations, desc="Fig. 1 samples", dynamic_ncols=True):
        inputs = encode_messages(processor, [conversation], model.device)
        shifts.append(hidden_state_shift(model, inputs, max_new_tokens))
        for name in presses:
            press = make_press(name, budget=budget)
            per_step[name].append(attention_coverage(model, inputs, press, max_new_tokens).per_step)
    stats = ("prefill_mean", "prefill_std", "decode_mean", "decode_std")
    layers = [
        {
            "layer": layer,
            **{s: statistics.fmean(getattr(sample[layer], s) for sample in shifts) for s in stats},
        }
        for layer in range(len(shifts[0]))
    ]
    for row in layers:
        row["std_ratio"] = row["decode_std"] / row["prefill_std"] if row["prefill_std"] else math.nan
    coverage = {}
    for name, tensors in per_step.items():
        # each tensor: (steps, layers, batch=1, kv_heads)
        distribution = [float(v) for t in tensors for v in t.mean(dim=(1, 2, 3))]
        coverage[name] = {
            "mean": statistics.fmean(distribution),
            "std": statistics.pstdev(distribution),
            "per_layer": torch.stack([t.mean(dim=(0, 2, 3)) for t in tensors]).mean(0).tolist(),
            "per_sample": [float(t.mean()) for t in tensors],
            "distribution": distribution,
        }
    return {
        "num_samples": len(conversations),
        "budget": budget,
        "max_new_tokens": max_new_tokens,
        "hidden_state_shift": layers,
        "coverage": coverage,
    }
