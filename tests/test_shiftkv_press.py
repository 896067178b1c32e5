"""ShiftKVPress end to end: proxies, positions, switches, determinism, every family."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import mmshiftkv.presses.shiftkv as shiftkv_module
from mmshiftkv.cache import cache_argument
from mmshiftkv.models.adapter import get_adapter
from mmshiftkv.models.positions import rope_index
from mmshiftkv.ops.reference import group_attention_mass, shiftkv_scores_reference
from mmshiftkv.presses import LastAttnPress, ShiftKVPress, select_kept_indices
from mmshiftkv.testing import FAMILIES, QUESTION, build_tiny_model, greedy, make_inputs, tiny

SMALL = dict(n_proxies=64, n_groups=8)


def prefill(model, inputs: dict, press) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, cache))
    return cache


class ScoreSpy:
    """Record the arguments ShiftKVPress passes to the scoring op."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        real = shiftkv_module.ops.shiftkv_scores

        def spy(proxies, keys, last_query, **kwargs):
            self.calls.append((proxies, keys, last_query, kwargs))
            return real(proxies, keys, last_query, **kwargs)

        monkeypatch.setattr(shiftkv_module.ops, "shiftkv_scores", spy)


def plain_rope(states: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate ``(heads, n, d)`` states to 1-D ``positions`` ``(n,)``, from the RoPE definition."""
    dim = states.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = dim // 2
    rotated = torch.cat([-states[..., half:], states[..., :half]], -1)
    return (states.double() * cos + rotated.double() * sin).float()


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "llava", "llama"])
def test_proxies_sit_at_the_next_decode_position_plus_offsets(family: str, monkeypatch):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    spy = ScoreSpy(monkeypatch)
    press = ShiftKVPress(budget=8, position_start=3, position_stride=5, **SMALL)
    decoder = model.model.language_model if hasattr(model.model, "language_model") else model.model
    attention_inputs: dict[int, torch.Tensor] = {}

    def record(module, args, kwargs):
        attention_inputs[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in decoder.layers]
    prefill(model, inputs, press)
    for hook in hooks:
        hook.remove()

    if family.startswith("qwen"):
        positions = rope_index(model, inputs)
        next_position = int(positions.max()) + 1
        assert next_position < inputs["input_ids"].shape[1]  # image positions are compressed
    else:
        next_position = inputs["input_ids"].shape[1]
    group = 64 // 8
    expected_positions = next_position + 3 + 5 * (torch.arange(64) % group)
    for layer, (proxies, _, _, _) in enumerate(spy.calls):
        attn = decoder.layers[layer].self_attn
        # Eq. 5-6 directly: the proxy hidden states through q_proj (the press projects the noise once).
        with torch.no_grad():
            proxy_states = press.proxy_hidden_states(attention_inputs[layer], layer)[0]
            raw = attn.q_proj(proxy_states).view(64, -1, attn.head_dim).transpose(0, 1)
        torch.testing.assert_close(proxies[0], plain_rope(raw, expected_positions), atol=1e-4, rtol=1e-4)


def test_kept_set_equals_the_reference_scoring_of_the_same_inputs(monkeypatch):
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    spy = ScoreSpy(monkeypatch)
    press = ShiftKVPress(budget=8, **SMALL)
    prefill(model, inputs, press)
    for layer, (proxies, keys, last_query, kwargs) in enumerate(spy.calls):
        scores = shiftkv_scores_reference(
            proxies, keys, last_query, n_groups=8, tau=0.95, scaling=kwargs["scaling"], anchor_weight=1.0
        )
        expected, _ = select_kept_indices(scores, 8)
        assert torch.equal(press.stats.indices[layer], expected)


def test_statistics_modes_shape_the_proxy_distribution():
    torch.manual_seed(0)
    hidden = torch.randn(1, 300, 16) * torch.linspace(0.1, 3.0, 16) + torch.linspace(-2, 2, 16)
    per_feature = ShiftKVPress(statistics="per_feature", gamma=2.0, n_proxies=8192, n_groups=1)
    global_ = ShiftKVPress(statistics="global", gamma=2.0, n_proxies=8192, n_groups=1)
    proxies = per_feature.proxy_hidden_states(hidden, 0)[0]
    torch.testing.assert_close(proxies.mean(0), hidden[0].mean(0), atol=0.15, rtol=0)
    torch.testing.assert_close(proxies.std(0), 2.0 * hidden[0].std(0), atol=0, rtol=0.05)

    proxies = global_.proxy_hidden_states(hidden, 0)[0]
    flat = hidden[0].flatten()
    torch.testing.assert_close(proxies.mean(), flat.mean(), atol=0.1, rtol=0)
    # Isotropic: every feature spreads by gamma times the single global std.
    torch.testing.assert_close(proxies.std(0), torch.full((16,), 2.0 * float(flat.std())), atol=0, rtol=0.05)


def test_seed_makes_selection_deterministic_and_leaves_the_users_rng_alone():
    model, processor = tiny("qwen2-vl")
    inputs = make_inputs("qwen2-vl", processor, [QUESTION])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = ShiftKVPress(budget=6, **SMALL), ShiftKVPress(budget=6, **SMALL)
    prefill(model, inputs, first)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    prefill(model, inputs, second)
    for a, b in zip(first.stats.indices, second.stats.indices):
        assert torch.equal(a, b)
    other = ShiftKVPress(budget=6, seed=7, **SMALL)
    hidden = torch.randn(1, 20, 64)
    assert not torch.equal(first.proxy_hidden_states(hidden, 0), other.proxy_hidden_states(hidden, 0))


def test_ablation_switches(monkeypatch):
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    no_sampling, last_attn = ShiftKVPress(budget=8, sampling=False, **SMALL), LastAttnPress(budget=8)
    prefill(model, inputs, no_sampling)
    prefill(model, inputs, last_attn)
    for a, b in zip(no_sampling.stats.indices, last_attn.stats.indices):
        assert torch.equal(a, b)

    # gamma = 1: proxies spread by sigma, not 10 sigma.
    hidden = torch.randn(1, 50, 64)
    wide, narrow = ShiftKVPress(**SMALL), ShiftKVPress(gamma=1.0, **SMALL)
    spread = wide.proxy_hidden_states(hidden, 0).std() / narrow.proxy_hidden_states(hidden, 0).std()
    assert 9.0 < float(spread) < 11.0

    # voting=False ranks by the summed proxy mass plus the anchor.
    spy = ScoreSpy(monkeypatch)
    voting = ShiftKVPress(budget=8, **SMALL)
    prefill(model, inputs, voting)
    no_voting = ShiftKVPress(budget=8, voting=False, **SMALL)
    prefill(model, inputs, no_voting)
    for layer, (proxies, keys, last_query, kwargs) in enumerate(spy.calls):
        mass, anchor = group_attention_mass(proxies, keys, last_query, n_groups=8, scaling=kwargs["scaling"])
        expected, _ = select_kept_indices(mass.sum(2) + anchor, 8)
        assert torch.equal(no_voting.stats.indices[layer], expected)


def test_reference_preset_reproduces_the_released_code_settings(monkeypatch):
    press = ShiftKVPress.reference(budget=16)
    assert (press.statistics, press.coverage) == ("global", "within")
    assert press.anchor_in_groups and press.exclude_last_key
    # Proxy j of each group sits at last_pos + 32 * (j + 1): next + 31 + 32 j.
    assert (press.position_start, press.position_stride) == (31, 32)
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    spy = ScoreSpy(monkeypatch)
    prefill(model, inputs, ShiftKVPress.reference(budget=8))
    kwargs = spy.calls[0][3]
    assert kwargs["coverage"] == "within" and kwargs["anchor_in_groups"] and kwargs["exclude_last_key"]
    assert ShiftKVPress.reference(tau=0.5).tau == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"gamma": 0.0}, "gamma"),
        ({"n_proxies": 100, "n_groups": 32}, "multiple of n_groups"),
        ({"statistics": "median"}, "statistics"),
        ({"coverage": "all"}, "coverage"),
        ({"backend": "gpu"}, "backend"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        ShiftKVPress(**kwargs)


def test_default_budget_is_documented_and_ratio_replaces_it():
    assert ShiftKVPress(gamma=10, tau=0.95).budget == 64
    assert ShiftKVPress(compression_ratio=0.5).budget is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generates_on_every_family(family: str, attn: str, dtype: torch.dtype):
    model, processor = build_tiny_model(family, attn_implementation=attn, dtype=dtype)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"], image_seeds=[0, 1])
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    press = ShiftKVPress(budget=10, **SMALL)
    with press(model):
        tokens = greedy(model, inputs, max_new_tokens=3)
    assert tokens.shape[0] == 2
    assert press.stats.kept.max() == 10
    assert not math.isnan(float(press.stats.bytes_after))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3.5-text"])  # q bias, q-norm, gated q_proj
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projected_noise_equals_projecting_each_proxy(family: str, dtype: torch.dtype):
    model, _ = build_tiny_model(family, dtype=dtype)
    adapter = get_adapter(model)
    module = adapter.attention_modules[-1]
    hidden = (torch.randn(2, 40, model.config.get_text_config().hidden_size) * 3 + 0.5).to(dtype)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, :7] = False  # left padding stays out of the statistics either way
    press = ShiftKVPress(**SMALL)
    with torch.no_grad():
        direct = adapter.query_states(module, press.proxy_hidden_states(hidden, module.layer_idx, key_mask))
        assert adapter.query_projection(module) is module.q_proj
        projected = press.proxy_queries(adapter, module, hidden, key_mask)
        # The direct path rounds each proxy to the model dtype before its GEMM: one rounding apart.
        tolerance = 1e-5 if dtype == torch.float32 else 3 * 2**-8
        scale = float(direct.float().abs().max())
        torch.testing.assert_close(projected.float(), direct.float(), atol=tolerance * scale, rtol=tolerance)

        # Weights changed in place are noticed; per-feature statistics always project each proxy.
        module.q_proj.weight.mul_(2)
        direct = adapter.query_states(module, press.proxy_hidden_states(hidden, module.layer_idx, key_mask))
        projected = press.proxy_queries(adapter, module, hidden, key_mask)
        scale = float(direct.float().abs().max())
        torch.testing.assert_close(projected.float(), direct.float(), atol=tolerance * scale, rtol=tolerance)
        per_feature = ShiftKVPress(statistics="per_feature", **SMALL)
        states = per_feature.proxy_hidden_states(hidden, module.layer_idx, key_mask)
        assert torch.equal(
            per_feature.proxy_queries(adapter, module, hidden, key_mask), adapter.query_states(module, states)
        )


def test_statistics_match_a_plain_recomputation():
    torch.manual_seed(1)
    # A far-off first chunk (a shifted system prompt) must not cost the variance its precision.
    hidden = torch.randn(2, 3000, 48) * torch.linspace(0.5, 2.0, 48) + 3.0
    hidden[:, :400] += 50.0
    key_mask = torch.ones(2, 3000, dtype=torch.bool)
    key_mask[0, :123] = False
    for statistics in ("global", "per_feature"):
        for window in (None, 700):
            press = ShiftKVPress(statistics=statistics, stats_window=window)
            mean, std = press.prompt_statistics(hidden, key_mask)
            for sample in range(2):
                real = hidden[sample][key_mask[sample]].double()
                real = real if window is None else real[-window:]
                real = real.flatten() if statistics == "global" else real
                expected_mean = real.mean(0).reshape(-1)
                torch.testing.assert_close(mean[sample].double(), expected_mean, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(std[sample].double(), real.std(0).reshape(-1), rtol=1e-5, atol=0)
