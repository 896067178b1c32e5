"""MixKV redundancy scores for any supported model: how alike each KV head's keys and values are.

Per calibration prompt, one prefill; per KV layer and KV head, the mean pairwise cosine similarity of
the prompt's cached keys (rotated, as MixKV mixes them) and of its values,
:func:`~mmshiftkv.presses.redundancy.mean_pairwise_cosine`. The file holds one float per prompt under
``"<layer>-<kv head>-key"`` and ``"<layer>-<kv head>-value"``, the format of the MixKV repository's
``qwen_kv_similarity.json``, which :class:`~mmshiftkv.presses.MixKVPress` reads
(``mmshiftkv calibrate MODEL OUT.json --scores redundancy`` renders the SparseMM calibration's
synthetic text images with its OCR request).

The reference repository ships one such file (Qwen2-VL-7B, 10 samples) and no script that computes
it; its ``calcul_similarity_score`` computes this very quantity per prompt (and leaves it unused),
so that is what is averaged here. Layers are the KV-holding layers in order (hybrid models' linear
attention layers have no KV); a sliding-window layer holds, and is scored over, its window only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmshiftkv.cache.compat import returned_cache
from mmshiftkv.generation import encode_messages
from mmshiftkv.models.adapter import get_adapter
from mmshiftkv.presses.redundancy import mean_pairwise_cosine, save_redundancy_scores


@torch.no_grad()
def compute_redundancy_scores(
    model: nn.Module, processor: Any, conversations: Sequence[list[dict]], path: str | None = None
) -> dict[str, list[float]]:
    """Per-prompt key and value redundancy of every (KV layer, KV head).

    Parameters
    ----------
    model : nn.Module
        Any model :func:`~mmshiftkv.models.get_adapter` accepts.
    processor : Any
        Its processor (or tokenizer) with a chat template.
    conversations : sequence of list of dict
        Calibration prompts, one chat each (:func:`~mmshiftkv.generation.user_turn`); each is
        prefilled alone (no padding).
    path : str, optional
        Also write the scores there (JSON, :func:`~mmshiftkv.presses.redundancy.save_redundancy_scores`).

    Returns
    -------
    dict[str, list[float]]
        ``"layer-head-key"`` and ``"layer-head-value"`` -> one float per prompt.

    Raises
    ------
    ValueError
        If the model returns no transformers ``Cache`` to read the keys from.
    """
    adapter = get_adapter(model)
    per_prompt = []
    for conversation in conversations:
        inputs = encode_messages(processor, [conversation], model.device)
        cache = returned_cache(model(**inputs, use_cache=True))
        if cache is None:
            raise ValueError(
                f"{type(model).__name__} returned no transformers Cache, so there are no keys to measure: "
                "use a transformers release where this model uses DynamicCache"
            )
        layers = [cache.layers[module.layer_idx] for module in adapter.attention_modules]
        keys = torch.stack([mean_pairwise_cosine(layer.keys)[0] for layer in layers])
        values = torch.stack([mean_pairwise_cosine(layer.values)[0] for layer in layers])
        per_prompt.append(torch.stack([keys, values]).double().cpu())  # (2, kv layers, kv heads)
    table = torch.stack(per_prompt).permute(1, 2, 3, 0).tolist()  # (key/value, layer, head, prompt)
    scores = {
        f"{layer}-{head}-{kind}": table[k][layer][head]
        for layer in range(adapter.n_layers)
        for head in range(adapter.n_kv_heads)
        for k, kind in enumerate(("key", "value"))
    }
    if path is not None:
        save_redundancy_scores(scores, path)
    return scores
