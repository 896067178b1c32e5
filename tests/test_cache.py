"""Variable-length compressed cache layers and their attention, against a full-cache reference.

The reference keeps the FULL prefill cache and hides the evicted prompt keys of every
(sample, KV head) with a plainly written masked attention, registered under its own name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from mmshiftkv.cache import (
    CompressedLayer,
    attention,
    cache_argument,
    compressed_attention,
    compressed_sdpa,
    find_cache,
)
from mmshiftkv.cache.attention import compressed_flash_varlen
from mmshiftkv.cache.compat import crop_to
from mmshiftkv.cache.reading import READING
from mmshiftkv.models import find_decoder
from mmshiftkv.presses.selection import select_kept_indices

IMPLEMENTATIONS = ["eager", "sdpa"]
REFERENCE = "mmshiftkv_test_reference"
# layer index -> (batch, kv_heads, prompt_len) bool, the prompt keys the reference may see
KEPT: dict[int, torch.Tensor] = {}


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    # transformers' attention-function signature: wrappers (kvpress's patch) pass dropout positionally
    """Full-cache attention hiding the evicted prompt keys per (sample, KV head)."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    if attention_mask is None:
        query_position = torch.arange(kv_len - q_len, kv_len)
        allowed = torch.arange(kv_len)[None, :] <= query_position[:, None]
        allowed = allowed.expand(batch, kv_heads, q_len, kv_len).clone()
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, :, :, :kv_len].expand(batch, kv_heads, q_len, kv_len).clone()
    else:
        allowed = (attention_mask[:, :, :, :kv_len] == 0).expand(batch, kv_heads, q_len, kv_len).clone()
    kept = KEPT.get(getattr(module, "layer_idx", -1))
    if kept is not None:
        allowed[..., : kept.shape[-1]] &= kept[:, :, None, :]
    allowed = allowed.repeat_interleave(group, dim=1)
    keys = key.repeat_interleave(group, dim=1)
    values = value.repeat_interleave(group, dim=1)
    scores = (query @ keys.transpose(-1, -2)) * (head_dim**-0.5 if scaling is None else scaling)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32)
    return (weights.to(values.dtype) @ values).transpose(1, 2), None


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


@contextmanager
def reference_implementation(model) -> Iterator[None]:
    config = find_decoder(model).config
    original = config._attn_implementation
    config._attn_implementation = REFERENCE
    try:
        yield
    finally:
        config._attn_implementation = original


def tiny_llama(implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=implementation,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2_5_vl(implementation: str) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 97,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [0],
        },
        attn_implementation=implementation,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def random_selection(
    keys: torch.Tensor, key_mask: torch.Tensor | None, n_kept: torch.Tensor | int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(keys.shape[:3], generator=generator)
    return select_kept_indices(scores, n_kept, key_mask)


def kept_mask(indices: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    kept = torch.zeros(*lengths.shape, seq_len, dtype=torch.bool)
    for b in range(lengths.shape[0]):
        for h in range(lengths.shape[1]):
            kept[b, h, indices[b, h, : lengths[b, h]]] = True
    return kept


def layer_budgets(layer_idx: int, batch: int, kv_heads: int, seq_len: int) -> torch.Tensor | int:
    """Layer 0 uniform (clipped for short samples), the others head-wise and sample-wise random."""
    if layer_idx == 0:
        return 10
    generator = torch.Generator().manual_seed(100 + layer_idx)
    return torch.randint(1, seq_len + 1, (batch, kv_heads), generator=generator)


def compress_cache(cache: DynamicCache, key_mask: torch.Tensor | None, seq_len: int) -> None:
    """Replace every layer by a CompressedLayer and record what the reference may see.

    Layer 2 tolerates padding, so that it holds one padded bucket for the whole batch.
    """
    KEPT.clear()
    for idx, layer in enumerate(cache.layers):
        batch, kv_heads = layer.keys.shape[:2]
        budgets = layer_budgets(idx, batch, kv_heads, seq_len)
        indices, lengths = random_selection(layer.keys, key_mask, budgets, seed=idx)
        KEPT[idx] = kept_mask(indices, lengths, seq_len)
        tolerance = 0.5 if idx == 2 else 0.02
        cache.layers[idx] = CompressedLayer.from_selection(
            layer.keys, layer.values, indices, lengths, padding_tolerance=tolerance
        )


MODELS = {"llama": tiny_llama, "qwen2_5_vl": tiny_qwen2_5_vl}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", list(MODELS))
def test_decode_matches_masked_full_cache(family: str, implementation: str) -> None:
    model = MODELS[family](implementation)
    batch, seq_len = 2, 12
    input_ids = torch.randint(0, 97, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    if family == "llama":
        # left padding; the short sample keeps fewer tokens
        prompt_mask = torch.ones(batch, seq_len, dtype=torch.long)
        prompt_mask[1, :3] = 0
    else:
        prompt_mask = None
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=prompt_mask, **cache_argument(model, cache))
    reference_cache = copy.deepcopy(cache)
    compress_cache(cache, None if prompt_mask is None else prompt_mask.bool(), seq_len)
    layers = list(cache.layers)
    assert len({tuple(layer.prompt_lengths.flatten().tolist()) for layer in layers}) == len(layers)
    assert layers[2].buckets[0].padded and layers[2].buckets[0].covers_batch
    for layer in layers[:2]:
        assert layer.ideal_nbytes <= layer.nbytes <= 1.05 * layer.ideal_nbytes

    chunks = [1, 1, 1, 3, 1]
    generator = torch.Generator().manual_seed(2)
    new_tokens = [torch.randint(0, 97, (batch, n), generator=generator) for n in chunks]

    def run(past: DynamicCache, tokens: list[torch.Tensor], seen: int) -> list[torch.Tensor]:
        logits = []
        for chunk in tokens:
            seen += chunk.shape[1]
            mask = None
            if prompt_mask is not None:
                mask = torch.cat([prompt_mask, torch.ones(batch, seen - seq_len, dtype=torch.long)], 1)
            with torch.no_grad():
                out = model(input_ids=chunk, attention_mask=mask, **cache_argument(model, past))
            logits.append(out.logits)
        return logits

    with reference_implementation(model):
        expected = run(reference_cache, new_tokens, seq_len)
    with compressed_attention(model):
        actual = run(cache, new_tokens, seq_len)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == seq_len + sum(chunks)
    for layer in layers[:2]:
        assert layer.ideal_nbytes == ideal_bytes(layer.prompt_lengths, sum(chunks), layer.head_dim, 4)
        assert layer.ideal_nbytes <= layer.nbytes <= 1.05 * layer.ideal_nbytes

    # Restore the compressed prompt and ask another multi-token question.
    crop_to(cache, seq_len)
    crop_to(reference_cache, seq_len)
    question = [torch.randint(0, 97, (batch, 4), generator=generator), new_tokens[0]]
    with reference_implementation(model):
        expected = run(reference_cache, question, seq_len)
    with compressed_attention(model):
        actual = run(cache, question, seq_len)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_generate_with_compression_during_prefill() -> None:
    model = tiny_llama("sdpa")
    input_ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    budgets = {idx: layer_budgets(idx, 2, 2, 10) for idx in range(3)}

    def compress(module, args, kwargs, output) -> None:
        cache, idx = find_cache(args, kwargs), module.layer_idx
        layer = cache.layers[idx]
        if isinstance(layer, CompressedLayer):
            return
        indices, lengths = random_selection(layer.keys, None, budgets[idx], seed=idx)
        cache.layers[idx] = CompressedLayer.from_selection(layer.keys, layer.values, indices, lengths)

    handles = [
        layer.self_attn.register_forward_hook(compress, with_kwargs=True) for layer in model.model.layers
    ]
    try:
        with compressed_attention(model), torch.no_grad():
            out = model.generate(
                input_ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
    finally:
        for handle in handles:
            handle.remove()

    # Reference: greedy loop over the full cache with the evicted keys masked.
    KEPT.clear()
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(input_ids=input_ids, **cache_argument(model, cache)).logits[:, -1]
    for idx, layer in enumerate(cache.layers):
        KEPT[idx] = kept_mask(*random_selection(layer.keys, None, budgets[idx], seed=idx), 10)
    tokens, scores = [], [logits]
    with reference_implementation(model), torch.no_grad():
        for _ in range(4):
            tokens.append(scores[-1].argmax(-1, keepdim=True))
            scores.append(model(input_ids=tokens[-1], **cache_argument(model, cache)).logits[:, -1])
    tokens.append(scores[-1].argmax(-1, keepdim=True))
    assert torch.equal(out.sequences[:, 10:], torch.cat(tokens, 1))
    for got, want in zip(out.scores, scores):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- storage


def random_layer(
    batch: int = 3, kv_heads: int = 4, seq_len: int = 64, head_dim: int = 16, budgets=None, **options
) -> tuple[CompressedLayer, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator)
    values = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator)
    if budgets is None:
        budgets = torch.randint(1, seq_len + 1, (batch, kv_heads), generator=generator)
    indices, lengths = random_selection(keys, None, budgets, seed=6)
    return (
        CompressedLayer.from_selection(keys, values, indices, lengths, **options),
        keys,
        values,
        indices,
        lengths,
    )


def test_num_heads_is_the_deprecated_name_of_kv_heads() -> None:
    layer, *_ = random_layer(batch=2, kv_heads=3)
    assert layer.kv_heads == 3
    with pytest.warns(DeprecationWarning, match="renamed kv_heads") as record:
        assert layer.num_heads == 3
    assert record[0].filename == __file__


def ideal_bytes(lengths: torch.Tensor, generated: int, head_dim: int, itemsize: int) -> int:
    return (int(lengths.sum()) + lengths.numel() * generated) * 2 * head_dim * itemsize


def test_bytes_follow_per_head_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, *_, lengths = random_layer(batch=4, kv_heads=4, seq_len=256, head_dim=32)
    assert torch.equal(layer.prompt_lengths, lengths)
    ideal = ideal_bytes(lengths, 0, 32, 4)
    assert layer.ideal_nbytes == ideal
    assert ideal <= layer.nbytes <= 1.05 * ideal
    # versus padding every head to the layer's largest budget
    assert layer.nbytes < 0.8 * lengths.max().item() * lengths.numel() * 2 * 32 * 4

    monkeypatch.setattr(READING, "model", object())
    for _ in range(7):
        new = torch.randn(4, 4, 1, 32)
        layer.update(new, new)
    assert layer.ideal_nbytes == ideal_bytes(lengths, 7, 32, 4)
    assert layer.ideal_nbytes <= layer.nbytes <= 1.05 * layer.ideal_nbytes


@pytest.mark.parametrize("budget", [5, 64])
def test_uniform_lengths_hold_no_padding(budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    layer, *_, lengths = random_layer(budgets=budget)
    assert len(layer.buckets) == 1 and layer.buckets[0].heads_per_row == 1
    assert layer.nbytes == ideal_bytes(lengths, 0, 16, 4)
    monkeypatch.setattr(READING, "model", object())
    new = torch.randn(3, 4, 2, 16)
    layer.update(new, new)
    assert layer.nbytes == ideal_bytes(lengths, 2, 16, 4)


def test_sample_buckets_respect_tolerance_and_cap() -> None:
    budgets = torch.tensor([[40] * 4, [39] * 4, [20] * 4, [64] * 4, [10] * 4, [11] * 4])
    layer, *_, lengths = random_layer(batch=6, budgets=budgets)
    assert len(layer.buckets) == 4  # {64}, {40, 39}, {20}, {11, 10}: 1 padded token each
    assert layer.nbytes <= 1.02 * ideal_bytes(lengths, 0, 16, 4)
    capped, *_ = random_layer(batch=6, budgets=budgets, max_buckets=2)
    assert len(capped.buckets) == 2
    assert sorted(s for bucket in capped.buckets for s in bucket.samples.tolist()) == list(range(6))


def test_logical_length_crop_and_mask_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, keys, values, indices, lengths = random_layer(seq_len=64)
    assert layer.get_seq_length() == 64
    assert CompressedLayer.from_selection(keys, values, indices, lengths, seq_len=80).get_seq_length() == 80
    assert layer.get_mask_sizes(torch.arange(64, 67)) == (67, 0)

    monkeypatch.setattr(READING, "model", object())
    prompt_bytes = layer.nbytes
    for _ in range(3):
        new = torch.randn(3, 4, 2, 16)
        layer.update(new, new)
    assert layer.get_seq_length() == 70 and layer.generated_length == 6
    layer.crop(-2)  # a negative count removes tokens on every transformers release
    assert layer.get_seq_length() == 68
    layer.crop(-4)
    assert layer.get_seq_length() == 64 and layer.nbytes == prompt_bytes
    with pytest.raises(ValueError, match="compressed"):
        layer.crop(-1)
    assert layer.get_seq_length() == 64
    # A positive value follows the installed transformers' DynamicLayer: a length to keep, or refused.
    reference = DynamicLayer()
    reference.update(torch.zeros(1, 1, 70, 1), torch.zeros(1, 1, 70, 1))
    layer.update(*(torch.randn(2, 3, 4, 6, 16)))
    try:
        reference.crop(66)
    except ValueError:
        with pytest.raises(ValueError, match="negative"):
            layer.crop(66)
    else:
        layer.crop(66)
        assert layer.get_seq_length() == reference.get_seq_length() == 66


def test_update_outside_context_is_refused() -> None:
    layer, *_ = random_layer()
    new = torch.randn(3, 4, 1, 16)
    with pytest.raises(RuntimeError, match="compressed_attention"):
        layer.update(new, new)


def test_bad_selection_is_rejected() -> None:
    keys = torch.randn(2, 2, 8, 4)
    indices, lengths = random_selection(keys, None, 3, seed=0)
    with pytest.raises(ValueError, match="lengths"):
        CompressedLayer.from_selection(keys, keys, indices, lengths + 5)
    with pytest.raises(ValueError, match="indices"):
        CompressedLayer.from_selection(keys, keys, indices[0], lengths)
    with pytest.raises(ValueError, match="kept indices"):
        CompressedLayer.from_selection(keys, keys, indices + 8, lengths)
    with pytest.raises(TypeError):
        CompressedLayer.from_selection(keys, keys, indices.float(), lengths)
    with pytest.raises(ValueError, match="max_buckets"):
        CompressedLayer.from_selection(keys, keys, indices, lengths, max_buckets=0)
    with pytest.raises(ValueError, match="padding_tolerance"):
        CompressedLayer.from_selection(keys, keys, indices, lengths, padding_tolerance=-0.1)


# -------------------------------------------------------------------- attention


def decode_setup(monkeypatch: pytest.MonkeyPatch, q_len: int = 3, group: int = 2, **options):
    layer, keys, values, indices, lengths = random_layer(**options)
    batch, kv_heads, seq_len, head_dim = keys.shape
    monkeypatch.setattr(READING, "model", object())
    new_keys, new_values = torch.randn(2, batch, kv_heads, 2 + q_len, head_dim)
    layer.update(new_keys[:, :, :2], new_values[:, :, :2])
    layer.update(new_keys[:, :, 2:], new_values[:, :, 2:])
    query = torch.randn(batch, kv_heads * group, q_len, head_dim)
    full = (torch.cat([keys, new_keys], 2), torch.cat([values, new_values], 2))
    return layer, query, full, kept_mask(indices, lengths, seq_len)


def masked_reference(query, full, kept, q_len):
    keys, values = full
    batch, kv_heads, kv_len, _ = keys.shape
    allowed = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
    allowed = allowed.expand(batch, kv_heads, q_len, kv_len).clone()
    allowed[..., : kept.shape[-1]] &= kept[:, :, None, :]
    KEPT.clear()
    return reference_attention(
        torch.nn.Module(), query, keys, values, torch.where(allowed, 0.0, float("-inf")), scaling=0.3
    )[0]


@pytest.mark.parametrize("options", [{}, {"budgets": 9}, {"padding_tolerance": 0.6}, {"max_buckets": 1}])
def test_compressed_sdpa_layouts(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    layer, query, full, kept = decode_setup(monkeypatch, **options)
    expected = masked_reference(query, full, kept, q_len=3)
    torch.testing.assert_close(
        compressed_sdpa(layer, query, None, scaling=0.3), expected, atol=1e-5, rtol=1e-5
    )
    # the same through a boolean (sdpa-style) and an additive (eager-style) model mask
    allowed = torch.ones(3, 1, 3, 64 + 5, dtype=torch.bool).tril(64 + 2)
    torch.testing.assert_close(compressed_sdpa(layer, query, allowed, 0.3), expected, atol=1e-5, rtol=1e-5)
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    torch.testing.assert_close(compressed_sdpa(layer, query, additive, 0.3), expected, atol=1e-5, rtol=1e-5)


def test_long_chunks_are_sliced(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, query, full, kept = decode_setup(monkeypatch, q_len=5)
    monkeypatch.setattr(attention, "MASK_ELEMENT_BUDGET", 1)
    expected = masked_reference(query, full, kept, q_len=5)
    torch.testing.assert_close(compressed_sdpa(layer, query, None, 0.3), expected, atol=1e-5, rtol=1e-5)


def test_padding_inside_the_new_tokens_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, query, full, kept = decode_setup(monkeypatch, q_len=3)
    # sample 0 has a padding token as the first token of the chunk (flash-style 2-D mask)
    padding = torch.ones(3, 64 + 5, dtype=torch.bool)
    padding[0, 64 + 2] = False
    keys, values = full
    allowed = torch.ones(3, 4, 3, 69, dtype=torch.bool).tril(66)
    allowed[..., :64] &= kept[:, :, None, :]
    allowed &= padding[:, None, None, :]
    KEPT.clear()
    expected = reference_attention(
        torch.nn.Module(), query, keys, values, torch.where(allowed, 0.0, -torch.inf), scaling=0.3
    )
    torch.testing.assert_close(compressed_sdpa(layer, query, padding, 0.3), expected[0], atol=1e-5, rtol=1e-5)


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """Plain-torch stand-in with flash_attn_varlen_func's contract (bottom-right causal, GQA)."""
    out = torch.empty_like(q)
    for i in range(cu_q.shape[0] - 1):
        qs, ks, vs = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        group = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
        if causal:
            lq, lk = qs.shape[0], ks.shape[0]
            visible = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        out[cu_q[i] : cu_q[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out


@pytest.mark.parametrize("options", [{}, {"budgets": 9}, {"padding_tolerance": 0.6}])
def test_flash_varlen_layout_with_torch_stand_in(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    layer, query, full, kept = decode_setup(monkeypatch, **options)
    expected = masked_reference(query, full, kept, q_len=3)
    got = compressed_flash_varlen(layer, query, 0.3, torch_varlen)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_select_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, query, full, kept = decode_setup(monkeypatch, q_len=1)
    expected = compressed_sdpa(layer, query, None, 0.3)
    order = torch.tensor([2, 0, 2, 1])
    layer.reorder_cache(order)
    assert torch.equal(layer.prompt_lengths, kept.sum(-1)[order])
    torch.testing.assert_close(compressed_sdpa(layer, query[order], None, 0.3), expected[order])
    layer.batch_select_indices(torch.tensor([True, False, False, True]))
    torch.testing.assert_close(compressed_sdpa(layer, query[[2, 1]], None, 0.3), expected[[2, 1]])


# ---------------------------------------------------------------------- context


@pytest.mark.parametrize("family", list(MODELS))
def test_context_restores_implementation(family: str) -> None:
    model = MODELS[family]("sdpa")
    decoder = find_decoder(model)
    input_ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        with compressed_attention(model):
            assert decoder.config._attn_implementation == "mmshiftkv_sdpa"
            with compressed_attention(model):  # re-entry is a no-op
                pass
            assert decoder.config._attn_implementation == "mmshiftkv_sdpa"
            inside = model(input_ids=input_ids).logits  # prefill: the original attention
    assert torch.equal(before, inside)
    assert decoder.config._attn_implementation == "sdpa"
    assert not our_hooks(decoder)
    if family == "qwen2_5_vl":
        assert model.config.vision_config._attn_implementation == "sdpa"

    with pytest.raises(KeyError), compressed_attention(model):
        raise KeyError("boom")
    assert decoder.config._attn_implementation == "sdpa"
    assert not our_hooks(decoder)
    assert READING.model is None


def our_hooks(decoder) -> list:
    """mmshiftkv's hooks left on the attention layers (transformers may keep its own there)."""
    return [
        hook
        for layer in decoder.layers
        for hooks in (layer.self_attn._forward_pre_hooks, layer.self_attn._forward_hooks)
        for hook in hooks.values()
        if getattr(hook, "__module__", "").startswith("mmshiftkv")
    ]


def test_unsupported_implementation_is_rejected() -> None:
    model = tiny_llama("sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"), compressed_attention(model):
        pass
