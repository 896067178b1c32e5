"""Every press on every family: budgets, real cache sizes, kept sets against plain re-computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import DynamicCache

from mmshiftkv.cache import CompressedLayer, cache_argument
from mmshiftkv.models import get_adapter
from mmshiftkv.models.positions import rope_index
from mmshiftkv.presses import (
    CompressionSkippedWarning,
    ExpectedAttentionPress,
    FullKVPress,
    KeyDiffPress,
    LastAttnPress,
    LookMPress,
    ShiftKVPress,
    SnapKVPress,
    StreamingLLMPress,
    UnsupportedCacheError,
    select_kept_indices,
)
from mmshiftkv.testing import FAMILIES, QUESTION, build_tiny_model, greedy, make_inputs, tiny

BUDGET = 8


def all_presses(budget: int = BUDGET):
    return [
        SnapKVPress(budget=budget),
        StreamingLLMPress(budget=budget),
        KeyDiffPress(budget=budget),
        ExpectedAttentionPress(budget=budget),
        LastAttnPress(budget=budget),
        ShiftKVPress(budget=budget, n_proxies=64, n_groups=8),
        LookMPress(budget=budget),
    ]


def prefill(model, inputs: dict, press=None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(**inputs, **cache_argument(model, cache))
        else:
            with press(model):
                model(**inputs, **cache_argument(model, cache))
    return cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_press_generates_and_holds_exactly_the_budget(family: str, attn: str):
    model, processor = tiny(family, attn)
    inputs = make_inputs(family, processor, [QUESTION])
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len > BUDGET
    for press in all_presses():
        cache = prefill(model, inputs, press)
        for layer in cache.layers:
            assert isinstance(layer, CompressedLayer)
            assert layer.prompt_lengths.eq(BUDGET).all()
            kv_bytes = (
                2 * BUDGET * model.config.get_text_config().num_key_value_heads * layer_head_dim(model) * 4
            )
            assert layer.ideal_nbytes == kv_bytes
            # Only a few bookkeeping tensors (row offsets, lengths) on top of the kept keys/values.
            assert kv_bytes <= layer.nbytes <= kv_bytes + 256
            assert layer.get_seq_length() == prompt_len
        assert press.stats.kept.eq(BUDGET).all()
        assert press.stats.bytes_after < press.stats.bytes_before
        with press(model):
            new_tokens = greedy(model, inputs, max_new_tokens=3)
        assert new_tokens.shape == (1, 3) or new_tokens.shape[1] <= 3


def layer_head_dim(model) -> int:
    config = model.config.get_text_config()
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava-next", "qwen3"])
def test_last_prompt_token_is_always_kept_and_order_is_temporal(family: str):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    prompt_len = inputs["input_ids"].shape[1]
    for press in all_presses(budget=3):
        prefill(model, inputs, press)
        for indices in press.stats.indices:
            assert indices is not None
            assert indices[..., -1].eq(prompt_len - 1).all()
            assert (indices.diff(dim=-1) > 0).all()


def model_attentions(model, inputs: dict) -> list[torch.Tensor]:
    """The model's own prefill attention probabilities, ``(batch, q_heads, seq, seq)`` per layer."""
    with torch.no_grad():
        return list(model(**inputs, output_attentions=True).attentions)


def group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return x.view(x.shape[0], kv_heads, -1, *x.shape[2:]).mean(2)


ATTENTION_FAMILIES = [
    *("qwen2.5-vl", "qwen2-vl", "llava-next", "llava", "qwen3"),
    *("qwen3-vl", "glm4v", "gemma3", "idefics3"),
]


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_attention_presses_match_the_models_own_attention(family: str):
    """SnapKV and LastAttn recomputed from the eager model's attention probabilities.

    M-RoPE (split and merged), GLM's pairwise partial rotary and Gemma 3's bidirectional image
    blocks included; sliding-window layers keep their window and are skipped.
    """
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, [QUESTION])
    attentions = model_attentions(model, inputs)
    kv_heads = model.config.get_text_config().num_key_value_heads
    seq_len = inputs["input_ids"].shape[1]
    window, kernel = 6, 5

    last = LastAttnPress(budget=BUDGET)
    snap = SnapKVPress(budget=BUDGET + window, window_size=window, kernel_size=kernel)
    prefill(model, inputs, last)
    prefill(model, inputs, snap)
    for layer, module in enumerate(get_adapter(model).attention_modules):
        probs = attentions[module.layer_idx]
        if last.stats.indices[layer] is None:
            assert getattr(module, "sliding_window", None)
            continue
        expected_last = group_mean(probs[:, :, -1, :].float(), kv_heads)
        idx, _ = select_kept_indices(expected_last, BUDGET)
        assert torch.equal(last.stats.indices[layer], idx)

        observed = probs[:, :, -window:, : seq_len - window].float().mean(2)
        pooled = F.avg_pool1d(observed, kernel, stride=1, padding=kernel // 2)
        prefix = group_mean(pooled, kv_heads)
        top = prefix.topk(BUDGET, dim=-1).indices.sort(-1).values
        expected = torch.cat([top, torch.arange(seq_len - window, seq_len).expand(1, kv_heads, -1)], -1)
        assert torch.equal(snap.stats.indices[layer], expected)


def test_keydiff_and_streaming_llm_match_their_formulas():
    family = "qwen2.5-vl"
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    seq_len = inputs["input_ids"].shape[1]
    full = prefill(model, inputs)
    keydiff, streaming = KeyDiffPress(budget=BUDGET), StreamingLLMPress(budget=BUDGET, n_sink=4)
    prefill(model, inputs, keydiff)
    prefill(model, inputs, streaming)
    for layer in range(len(full.layers)):
        keys = full.layers[layer].keys.float()
        anchor = (keys / keys.norm(dim=-1, keepdim=True)).mean(2, keepdim=True)
        cos = (keys * anchor).sum(-1) / (keys.norm(dim=-1) * anchor.norm(dim=-1))
        idx, _ = select_kept_indices(-cos, BUDGET)
        assert torch.equal(keydiff.stats.indices[layer], idx)
        expected = list(range(4)) + list(range(seq_len - (BUDGET - 4), seq_len))
        assert streaming.stats.indices[layer].eq(torch.tensor(expected)).all()


def rope_rotation(inv_freq: torch.Tensor, position: float) -> torch.Tensor:
    """The RoPE matrix of one position, built pair by pair (feature i rotates with i + d/2)."""
    half = inv_freq.numel()
    matrix = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for i, freq in enumerate(inv_freq.tolist()):
        c, s = math.cos(position * freq), math.sin(position * freq)
        matrix[i, i], matrix[i, i + half] = c, -s
        matrix[i + half, i], matrix[i + half, i + half] = s, c
    return matrix


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava"])
def test_expected_attention_matches_a_plain_recomputation(family: str):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    captured: dict[int, torch.Tensor] = {}
    decoder = model.model.language_model
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__(m.layer_idx, kw["hidden_states"]), with_kwargs=True
        )
        for layer in decoder.layers
    ]
    full = prefill(model, inputs)
    for hook in hooks:
        hook.remove()
    press = ExpectedAttentionPress(budget=BUDGET, n_future_positions=16, n_sink=4)
    prefill(model, inputs, press)

    config = decoder.config
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    with torch.no_grad():
        if family.startswith("qwen"):
            positions = rope_index(model, inputs)
            next_position = int(positions.max()) + 1
        else:
            next_position = inputs["input_ids"].shape[1]
    rotation = sum(rope_rotation(inv_freq, next_position + p) for p in range(16)) / 16
    for layer, hidden in captured.items():
        attn = decoder.layers[layer].self_attn
        with torch.no_grad():
            queries = attn.q_proj(hidden[0, 4:]).double().view(-1, config.num_attention_heads, head_dim)
        keys = full.layers[layer].keys[0].double()
        values = full.layers[layer].values[0].double()
        scores = []
        for head in range(config.num_attention_heads):
            q = queries[:, head]
            mean = rotation @ q.mean(0)
            cov = rotation @ ((q - q.mean(0)).T @ (q - q.mean(0)) / q.shape[0]) @ rotation.T
            k = keys[head // (config.num_attention_heads // config.num_key_value_heads)]
            logits = k @ mean / math.sqrt(head_dim) + 0.5 * torch.einsum("ti,ij,tj->t", k, cov, k) / head_dim
            scores.append(torch.softmax(logits, -1))
        scores = group_mean(torch.stack(scores)[None].float(), config.num_key_value_heads)[0]
        scores = scores * values.norm(dim=-1).float()
        scores[:, :4] = float("inf")
        idx, _ = select_kept_indices(scores[None], BUDGET)
        assert torch.equal(press.stats.indices[layer], idx)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "llava", "llama"])
def test_future_positions_are_the_positions_generate_uses(family: str):
    """The adapter's future positions equal the rotary positions of the generated tokens."""
    from mmshiftkv.models.adapter import get_adapter

    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"], image_seeds=[0, 1])
    adapter = get_adapter(model)
    seen: list[torch.Tensor] = []
    hook = adapter.language_model.rotary_emb.register_forward_pre_hook(
        lambda m, a, kw: seen.append(
            adapter.normalize_positions(
                kw.get("position_ids", a[1] if len(a) > 1 else None), a[0].shape[0] if a else kw["x"].shape[0]
            )
        ),
        with_kwargs=True,
    )
    press = SnapKVPress(budget=BUDGET, window_size=4)
    try:
        with press(model):
            model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    finally:
        hook.remove()
    prompt_positions, decode_positions = seen[0], torch.cat(seen[1:], dim=-1)
    expected = adapter.future_positions(prompt_positions, torch.arange(decode_positions.shape[-1]))
    assert torch.equal(decode_positions, expected)
    if family.startswith("qwen"):
        # After an image, M-RoPE text positions are compressed: the next position is not seq_len.
        assert int(adapter.next_positions(prompt_positions)[0]) < inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_kv_and_large_budgets_generate_exactly_like_no_press(family: str):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    prompt_len = inputs["input_ids"].shape[1]
    baseline = greedy(model, inputs)
    with FullKVPress()(model):
        assert torch.equal(greedy(model, inputs), baseline)
    for press in all_presses(budget=prompt_len):
        with pytest.warns(CompressionSkippedWarning, match="not longer than the budget"), press(model):
            assert torch.equal(greedy(model, inputs), baseline)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 0}, ValueError, "budget must be >= 1"),
        ({"budget": -3}, ValueError, "budget must be >= 1"),
        ({"budget": 2.5}, TypeError, "budget must be an int"),
        ({"compression_ratio": 1.0}, ValueError, r"compression_ratio must be in \[0, 1\)"),
        ({"compression_ratio": -0.1}, ValueError, r"compression_ratio must be in \[0, 1\)"),
        ({"budget": 8, "compression_ratio": 0.5}, ValueError, "either budget or compression_ratio"),
    ],
)
def test_bad_budgets_raise_clear_errors(kwargs: dict, error: type, match: str):
    presses = (SnapKVPress, StreamingLLMPress, KeyDiffPress, ExpectedAttentionPress, LastAttnPress)
    for press_cls in (*presses, LookMPress):
        with pytest.raises(error, match=match):
            press_cls(**kwargs)


def test_unsupported_model_is_rejected_naming_the_missing_part():
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmshiftkv.models.adapter import UnsupportedModelError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with (
        pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel: no text decoder .* `layers` list"),
        SnapKVPress(budget=4)(model),
    ):
        pass


def test_caches_a_press_cannot_compress_are_refused_by_name():
    # A fresh model: generate keeps its static cache on the model between calls.
    model, processor = build_tiny_model("llama")
    inputs = make_inputs("llama", processor, [QUESTION])
    # Nothing to compress, nothing refused: FullKV runs on a static cache like the bare model.
    with FullKVPress()(model):
        pressed = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    bare = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(pressed, bare)
    with (
        pytest.raises(UnsupportedCacheError, match="not StaticCache with StaticLayer layers.*DynamicCache"),
        SnapKVPress(budget=BUDGET)(model),
    ):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    with pytest.raises(UnsupportedCacheError, match="transformers Cache"), SnapKVPress(budget=BUDGET)(model):
        model(**inputs, **cache_argument(model, []))


def test_sliding_window_layers_keep_their_window_and_decoding_past_a_window_is_refused():
    model, processor = build_tiny_model("mistral")
    inputs = make_inputs("mistral", processor, [QUESTION])
    prompt_len = inputs["input_ids"].shape[1]
    model.config.sliding_window = 16
    assert prompt_len > 16
    # A sliding-window cache already holds only the window: the press leaves it, output unchanged.
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    press = SnapKVPress(budget=BUDGET)
    with press(model), pytest.warns(CompressionSkippedWarning), torch.no_grad():
        pressed = model.generate(
            **inputs,
            max_new_tokens=3,
            do_sample=False,
            **cache_argument(model, DynamicCache(config=model.config)),
        )
    assert torch.equal(plain, pressed) and not press.stats.compressed

    # A window the prompt fits in but decoding outgrows: compressed layers refuse instead of drifting.
    model.config.sliding_window = prompt_len + 2
    with (
        pytest.raises(NotImplementedError, match="sliding window of .* decoding past the window"),
        SnapKVPress(budget=BUDGET)(model),
    ):
        model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)


def test_hooks_and_attention_are_restored_when_generation_raises():
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    decoder = model.model.language_model
    implementation = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), SnapKVPress(budget=BUDGET)(model):
        raise RuntimeError("boom")
    del inputs
    assert model.config._attn_implementation == implementation
    assert decoder.config._attn_implementation == implementation
    # Only mmshiftkv's hooks are counted: transformers (5.23+) keeps its own output-capturing hooks.
    modules = [decoder, decoder.rotary_emb, *(layer.self_attn for layer in decoder.layers)]
    ours = [
        hook
        for module in modules
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for hook in hooks.values()
        if getattr(hook, "__module__", "").startswith("mmshiftkv")
    ]
    assert not ours


def test_compression_ratio_keeps_the_kvpress_count():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, [QUESTION])
    seq_len = inputs["input_ids"].shape[1]
    press = KeyDiffPress(compression_ratio=0.75)
    prefill(model, inputs, press)
    assert press.stats.kept.eq(int(seq_len * 0.25)).all()


def test_press_outside_a_prefill_says_nothing_was_compressed():
    model, _ = tiny("llama")
    with pytest.warns(CompressionSkippedWarning, match="no prefill ran"), SnapKVPress(budget=4)(model):
        pass
