"""MixKV: selections equal to the released code's (recorded oracles), the paper's formula recomputed
from the model's own attention, budgets on every family, batches, dtypes, allocators, calibration."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from transformers import DynamicCache

from mmshiftkv.allocators import AdaAllocator, PyramidAllocator
from mmshiftkv.cache import cache_argument
from mmshiftkv.evaluation.calibrate import main as calibrate_main
from mmshiftkv.evaluation.config import EvalConfig, plan_runs
from mmshiftkv.evaluation.redundancy import compute_redundancy_scores
from mmshiftkv.generation import encode_messages, user_turn
from mmshiftkv.models import get_adapter
from mmshiftkv.presses import (
    BudgetedPress,
    FullKVPress,
    MixKVPress,
    ScoringState,
    ShiftKVPress,
    SnapKVPress,
    select_kept_indices,
)
from mmshiftkv.presses.redundancy import (
    load_redundancy_scores,
    mean_pairwise_cosine,
    redundancy_table,
    save_redundancy_scores,
)
from mmshiftkv.registry import make_press
from mmshiftkv.testing import (
    ALL_FAMILIES,
    QUESTION,
    build_tiny_model,
    greedy,
    make_inputs,
    synthetic_image,
    tiny,
)

ORACLES = Path(__file__).parent / "data" / "mixkv"
#: Oracle cases whose prefix scores are within this of the cut are compared by the tie rule
#: (oracles' README): fp32 rounding differs between the reference's order of operations and ours.
TIE = 1e-6


def oracle(name: str) -> dict:
    return torch.load(ORACLES / f"{name}.pt", weights_only=True)


@dataclass
class RecordedAdapter:
    """What scoring reads from a model adapter, over the oracle's recorded (already rotated) queries."""

    queries: torch.Tensor
    n_layers: int
    n_kv_heads: int

    def query_states(self, module, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.queries[:, :, -hidden_states.shape[1] :]

    def apply_rope(self, queries: torch.Tensor, positions, module) -> torch.Tensor:
        return queries

    def ordinal(self, module) -> int:
        return module.layer_idx


@dataclass(kw_only=True)
class RecordedImportance(BudgetedPress):
    """An importance press that returns recorded prefix scores (the oracle's max-pooled attention)."""

    prefix_scores: torch.Tensor

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        window = keys.shape[2] - self.prefix_scores.shape[-1]
        return torch.cat([self.prefix_scores[None], torch.zeros(1, keys.shape[1], window)], -1)


def constant_redundancy(layers: int, heads: int, value: float) -> dict[str, list[float]]:
    return {f"{layer}-{head}-key": [value] for layer in range(layers) for head in range(heads)}


def press_for(method: str, case: dict, **fields) -> MixKVPress:
    """The MixKV configuration that computes the released code's ``select_method``."""
    meta = case["meta"]
    layers, heads = case["head_score_table"].shape
    window = meta["window_size"]
    fields = {"window_size": window, **fields}
    if meta["pooling"] == "maxpool":  # SnapKVPress pools by average only: the recorded attention stands in
        fields["base"] = RecordedImportance(prefix_scores=case["attn/scores"])
    if method == "attn":  # r = 0 and no intrinsic term: A
        return MixKVPress(redundancy=constant_redundancy(layers, heads, 0.0), intrinsic=None, **fields)
    if method == "keydiff":  # r = 1: S
        return MixKVPress(redundancy=constant_redundancy(layers, heads, 1.0), **fields)
    if method == "vnorm":  # r = 0: A + Vn
        return MixKVPress(redundancy=constant_redundancy(layers, heads, 0.0), **fields)
    if method == "mixkv":
        return MixKVPress.reference(**fields)
    assert method == "headwisemixkv"
    return MixKVPress.reference(redundancy=meta["head_score_json"], **fields)


def recorded_state(case: dict) -> ScoringState:
    layers, heads = case["head_score_table"].shape
    adapter = RecordedAdapter(queries=case["queries"], n_layers=layers, n_kv_heads=heads)
    return ScoringState(adapter=adapter, positions=torch.arange(case["keys"].shape[2])[None])


def oracle_scores(press: MixKVPress, case: dict) -> torch.Tensor:
    """The press's masked scores ``(1, kv_heads, N)`` on the oracle's tensors, at the oracle's layer."""
    keys, values = case["keys"], case["values"]
    module = SimpleNamespace(layer_idx=case["meta"]["layer_idx"], scaling=keys.shape[-1] ** -0.5)
    with press.scoring(recorded_state(case)):
        return press.masked_scores(module, torch.zeros(1, keys.shape[2], 1), keys, values, None, {})


def oracle_counts(press: MixKVPress, case: dict, scores: torch.Tensor | None) -> torch.Tensor:
    """The press's kept counts ``(1, kv_heads)`` for the oracle's prompt at the oracle's layer."""
    n = torch.tensor([case["keys"].shape[2]])
    with press.scoring(recorded_state(case)):
        return press.kept_counts(case["meta"]["layer_idx"], n, scores)


def assert_same_selection(kept: torch.Tensor, expected: torch.Tensor, scores: torch.Tensor, n: int, w: int):
    """One KV head's kept set equals the reference's: exactly where the reference's margin at the cut
    exceeds :data:`TIE`, else by the tie rule (strictly better kept, strictly worse evicted, count)."""
    kept, expected = set(kept.tolist()), set(expected.tolist())
    window = set(range(n - w, n))
    assert window <= kept and len(kept) == len(expected)
    kept_prefix, expected_prefix = kept - window, expected - window
    if not expected_prefix:
        return
    cut = float(scores[sorted(expected_prefix)].min())
    evicted = [float(scores[i]) for i in range(n - w) if i not in expected_prefix]
    if not evicted or cut - max(evicted) > TIE:
        assert kept_prefix == expected_prefix
    else:
        assert {i for i in range(n - w) if scores[i] > cut + TIE} <= kept_prefix
        assert kept_prefix <= {i for i in range(n - w) if scores[i] >= cut - TIE}


SNAPKV_CASES = [
    *(("snapkv_gqa", m) for m in ("attn", "keydiff", "vnorm", "mixkv", "headwisemixkv")),
    *(("snapkv_mha_maxpool", m) for m in ("attn", "keydiff", "vnorm", "mixkv", "headwisemixkv")),
    *(("pyramid_gqa", m) for m in ("attn", "headwisemixkv")),
]


@pytest.mark.parametrize(("name", "method"), SNAPKV_CASES)
def test_selection_equals_the_released_code(name: str, method: str):
    case = oracle(name)
    meta = case["meta"]
    n, window = case["keys"].shape[2], meta["window_size"]
    allocator = None
    if meta["pyram_mode"]:
        allocator = PyramidAllocator(beta=meta["pyram_beta"], window=window)
        allocator.bind(meta["num_hidden_layers"], case["queries"].shape[1], case["keys"].shape[1])
    press = press_for(method, case, budget=meta["max_capacity_prompt"], allocator=allocator)
    scores = oracle_scores(press, case)
    torch.testing.assert_close(scores[0, :, : n - window], case[f"{method}/scores"], atol=1e-6, rtol=1e-5)

    counts = oracle_counts(press, case, None)
    assert counts.eq(meta[f"{method}/capacity"] + window).all()  # PyramidKV: the reference's schedule
    indices, lengths = select_kept_indices(scores, counts)
    for head in range(case["keys"].shape[1]):
        assert_same_selection(
            indices[0, head, : lengths[0, head]],
            case[f"{method}/kept_indices"][head],
            case[f"{method}/scores"][head],
            n,
            window,
        )


@pytest.mark.parametrize("name", ["snapkv_budget_exceeds_prompt", "snapkv_budget_equals_prompt"])
def test_prompts_not_longer_than_the_budget_keep_every_token(name: str):
    case = oracle(name)
    meta = case["meta"]
    n = case["keys"].shape[2]
    press = press_for("headwisemixkv", case, budget=meta["max_capacity_prompt"])
    assert oracle_counts(press, case, None).eq(n).all()  # compress_layer leaves such a layer as it is
    if meta["headwisemixkv/compressed"]:  # n == budget: the reference keeps all, reordered
        assert all(sorted(row.tolist()) == list(range(n)) for row in case["headwisemixkv/kept_indices"])
    else:
        assert torch.equal(case["headwisemixkv/keys"], case["keys"])


@pytest.mark.parametrize("method", ["attn", "mixkv", "headwisemixkv"])
def test_adakv_allocates_from_the_attention_and_selects_by_the_mix(method: str):
    case = oracle("adakv_gqa")
    meta = case["meta"]
    n, window, kv_heads = case["keys"].shape[2], meta["window_size"], case["keys"].shape[1]
    allocator = AdaAllocator(alpha=meta["floor_alpha"], window=window, normalize=meta["normalize"])
    allocator.bind(2, case["queries"].shape[1], kv_heads)
    press = press_for(method, case, budget=meta["base_capacity"], allocator=allocator)
    scores = oracle_scores(press, case)
    torch.testing.assert_close(scores[0, :, : n - window], case[f"{method}/scores"], atol=1e-6, rtol=1e-5)
    counts = oracle_counts(press, case, scores)
    assert counts[0].tolist() == case[f"{method}/head_lens"].tolist()  # [21, 23, 17, 33]: 94, not 96
    indices, lengths = select_kept_indices(scores, counts)
    for head in range(kv_heads):
        assert_same_selection(
            indices[0, head, : lengths[0, head]],
            case[f"{method}/kept_indices"][head],
            case[f"{method}/scores"][head],
            n,
            window,
        )

    # allocation="mixed": AdaKV splits the budget by the mixed score (the reference's, recorded).
    mixed = MixKVPress(**{**press_fields(press), "allocation": "mixed"})
    counts = oracle_counts(mixed, case, oracle_scores(mixed, case))
    recorded = torch.cat([case[f"{method}/scores"], torch.full((kv_heads, window), 1e9)], -1)[None]
    expected = allocator.allocate(meta["base_capacity"], meta["layer_idx"], torch.tensor([n]), recorded)
    assert torch.equal(counts, expected)


def press_fields(press: MixKVPress) -> dict:
    names = (
        "budget",
        "allocator",
        "base",
        "window_size",
        "redundancy",
        "mixing",
        "uniform_weight",
        "intrinsic",
    )
    return {name: getattr(press, name) for name in names}


def test_redundancy_files_read_as_the_reference_reads_them(tmp_path: Path):
    for path in sorted(ORACLES.glob("*.pt")):
        case = torch.load(path, weights_only=True)
        file = tmp_path / "qwen_kv_similarity.json"
        file.write_text(json.dumps(case["meta"]["head_score_json"]))
        assert torch.equal(redundancy_table(load_redundancy_scores(file)), case["head_score_table"])
    scores = load_redundancy_scores(file)
    save_redundancy_scores(scores, tmp_path / "copy.json")
    assert load_redundancy_scores(tmp_path / "copy.json") == scores


def test_mean_pairwise_cosine_is_the_references_online_value_and_the_pairwise_mean():
    for path in sorted(ORACLES.glob("*.pt")):
        case = torch.load(path, weights_only=True)
        online = mean_pairwise_cosine(case["keys"])[0]
        torch.testing.assert_close(online, case["online_redundancy"], atol=1e-6, rtol=1e-5)

    keys = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :4] = False
    for b, n in ((0, 9), (1, 5)):
        unit = F.normalize(keys[b, :, 9 - n :], dim=-1)
        cosines = unit @ unit.transpose(-1, -2)
        pairwise = (cosines.sum((-1, -2)) - n) / (n * (n - 1))  # off-diagonal mean
        torch.testing.assert_close(
            mean_pairwise_cosine(keys, key_mask)[b].double(), pairwise, atol=1e-6, rtol=0
        )


# ------------------------------------------------------------------ in a model
def prefill(model, inputs: dict, press: BudgetedPress) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, cache))
    return cache


def redundancy_file(path: Path, layers: int = 2, heads: int = 2) -> Path:
    """Distinct redundancies per (layer, KV head), in the reference format (value lists included)."""
    scores = {}
    for layer in range(layers):
        for head in range(heads):
            spread = (layer * heads + head) / (layers * heads)
            scores[f"{layer}-{head}-key"] = [0.1 + 0.7 * spread, 0.2 + 0.7 * spread]
            scores[f"{layer}-{head}-value"] = [0.1, 0.2]
    path.write_text(json.dumps(scores))
    return path


def paper_scores(probs, keys, values, window: int, kernel: int, r: torch.Tensor) -> torch.Tensor:
    """The paper's score of the prefix tokens, from the model's own attention and cache (batch 1).

    A: window attention averaged over the window queries, pooled, averaged over the query heads of a
    KV head; S, Vn: min-max normalised, rescaled to the mean of A; ``r S + (1 - r)(A + Vn)``.
    """
    n, kv_heads = keys.shape[2], keys.shape[1]
    observed = probs[:, :, -window:, : n - window].double().mean(2)
    pooled = F.avg_pool1d(observed, kernel, stride=1, padding=kernel // 2)
    attention = pooled.view(1, kv_heads, -1, n - window).mean(2)
    unit = F.normalize(keys.double(), dim=-1)
    mean_key = unit.mean(2, keepdim=True)
    dissimilarity = -(unit[:, :, : n - window] @ mean_key.transpose(-1, -2))[..., 0]

    def rescaled(x):
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        normalized = (x - low) / (high - low)
        return normalized * attention.mean(-1, keepdim=True) / normalized.mean(-1, keepdim=True)

    value_norms = values[:, :, : n - window].double().norm(dim=-1)
    return r * rescaled(dissimilarity) + (1 - r) * (attention + rescaled(value_norms))


# M-RoPE; bidirectional image blocks and sliding layers
@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3"])
def test_paper_default_equals_a_plain_recomputation_from_the_models_attention(family: str, tmp_path: Path):
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, [QUESTION])
    with torch.no_grad():
        plain = model(**inputs, output_attentions=True, **cache_argument(model, DynamicCache()))
    adapter = get_adapter(model)
    budget, window = 14, 6
    path = redundancy_file(tmp_path / "redundancy.json", adapter.n_layers, adapter.n_kv_heads)
    table = redundancy_table(load_redundancy_scores(path)).double()
    for mixing in ("headwise", "online", "uniform"):
        press = MixKVPress(
            budget=budget,
            window_size=window,
            redundancy=path if mixing == "headwise" else None,
            mixing=mixing,
        )
        prefill(model, inputs, press)
        for ordinal, module in enumerate(adapter.attention_modules):
            if getattr(module, "sliding_window", None):
                assert press.stats.indices[ordinal] is None
                continue
            keys = plain.past_key_values.layers[module.layer_idx].keys
            values = plain.past_key_values.layers[module.layer_idx].values
            n = keys.shape[2]
            r = {
                "headwise": table[ordinal][None, :, None],
                "online": mean_pairwise_cosine(keys).double()[..., None],
                "uniform": torch.tensor(0.5, dtype=torch.float64),
            }[mixing]
            expected = paper_scores(plain.attentions[module.layer_idx], keys, values, window, 5, r)
            kept = press.stats.indices[ordinal]
            for head in range(adapter.n_kv_heads):
                top = expected[0, head].topk(budget - window).indices
                reference = torch.cat([top, torch.arange(n - window, n)])
                assert_same_selection(kept[0, head], reference, expected[0, head].float(), n, window)


def test_exact_budgets_on_every_family():
    """Every family of the models table: a left-padded batch of two, every KV layer at the budget.

    (Decoding over the compressed cache does not depend on the press: the models table and the
    press tests cover it; one ``generate`` step here runs the prefill as ``generate`` does.)
    """
    budget = 8
    for family in ALL_FAMILIES:
        model, processor = tiny(family)
        adapter = get_adapter(model)
        inputs = make_inputs(family, processor, [QUESTION, "Short?"])
        press = make_press("mixkv", budget=budget, window_size=4)
        with press(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tokens = greedy(model, inputs, max_new_tokens=1)
            except Exception as error:  # Qwen3.5 on transformers 5.2: its own cache class is refused
                assert type(error).__name__ == "UnsupportedCacheError", (family, error)
                continue
        assert tokens.shape[0] == 2, family
        expected = torch.tensor(press.stats.prompt_tokens).clamp(max=budget)[:, None]
        for ordinal, module in enumerate(adapter.attention_modules):
            if not getattr(module, "sliding_window", None):
                assert torch.equal(press.stats.kept[ordinal], expected.expand(-1, adapter.n_kv_heads)), family


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llama"])  # M-RoPE with an image; text only
def test_batch_with_left_padding_keeps_what_each_sample_keeps_alone(family: str):
    model, processor = tiny(family)
    questions = [QUESTION, "Read it."]
    batched = make_inputs(family, processor, questions)
    padding = (batched["attention_mask"] == 0).sum(-1)
    for press in (
        MixKVPress(budget=10, window_size=4, mixing="online"),
        MixKVPress(budget=10, window_size=4, allocator=AdaAllocator(window=4)),
        make_press(
            "mixkv", budget=10, window_size=4, base="shiftkv", base_fields={"n_proxies": 64, "n_groups": 8}
        ),
    ):
        prefill(model, batched, press)
        together = [(kept.clone(), indices) for kept, indices in zip(press.stats.kept, press.stats.indices)]
        for i, question in enumerate(questions):
            prefill(model, make_inputs(family, processor, [question], image_seeds=[i]), press)
            for (kept, indices), alone_kept, alone in zip(together, press.stats.kept, press.stats.indices):
                assert torch.equal(kept[i], alone_kept[0])
                if alone is None:  # prompt not longer than the budget
                    continue
                for head in range(kept.shape[1]):
                    row = indices[i, head, : kept[i, head]] - padding[i]
                    assert torch.equal(row, alone[0, head, : alone_kept[0, head]]), (
                        type(press.base),
                        i,
                        head,
                    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_in_float32_and_holds_the_budget(dtype: torch.dtype):
    model, processor = build_tiny_model("qwen2.5-vl", dtype=dtype)
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION, "Short?"], image_seeds=[0, 1])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    press = MixKVPress(budget=10, window_size=4)
    with press(model):
        tokens = greedy(model, inputs, max_new_tokens=3)
    assert tokens.shape[0] == 2 and press.stats.kept.max() == 10
    # The press computes in float32: half-precision tensors score as their float32 copies do.
    adapter = get_adapter(model)
    module = adapter.attention_modules[0]
    keys = torch.randn(1, 2, 30, module.head_dim).to(dtype)
    values = torch.randn(1, 2, 30, module.head_dim).to(dtype)
    hidden = torch.randn(1, 30, model.config.get_text_config().hidden_size).to(dtype)
    state = ScoringState(adapter=adapter, positions=torch.arange(30).expand(3, 1, 30))
    with press.scoring(state):
        half = press.score(module, hidden, keys, values, None, {})
        full = press.score(module, hidden, keys.float(), values.float(), None, {})
    assert half.dtype == torch.float32 and bool(half.isfinite().all())
    torch.testing.assert_close(half, full, atol=2e-2 * float(full[..., :-4].abs().max()), rtol=2e-2)


def test_ada_sees_the_base_press_scores_unless_told_otherwise():
    """allocation="base": AdaKV's counts are SnapKV's own under the same allocator (the released code)."""
    model, processor = tiny("qwen2.5-vl")
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION, "Short?"], image_seeds=[0, 1])
    snap = SnapKVPress(budget=12, window_size=4, allocator=AdaAllocator(window=4, normalize=True))
    prefill(model, inputs, snap)
    base = MixKVPress(budget=12, window_size=4, allocator=AdaAllocator(window=4, normalize=True))
    prefill(model, inputs, base)
    assert torch.equal(base.stats.kept, snap.stats.kept)
    assert not torch.equal(base.stats.indices[0], snap.stats.indices[0])  # the mix picks other tokens
    mixed = MixKVPress(
        budget=12, window_size=4, allocator=AdaAllocator(window=4, normalize=True), allocation="mixed"
    )
    prefill(model, inputs, mixed)
    assert not torch.equal(mixed.stats.kept, snap.stats.kept)


def test_registry_builds_the_papers_configuration_and_any_base():
    press = make_press("mixkv", budget=64)
    assert type(press.base) is SnapKVPress and (press.base.window_size, press.base.kernel_size) == (32, 5)
    assert (press.window_size, press.mixing, press.intrinsic, press.allocation) == (
        32,
        "uniform",
        "value_norm",
        "base",
    )
    press = make_press("mixkv", budget=64, allocator="ada", base="shiftkv", base_fields={"gamma": 5.0})
    assert type(press.base) is ShiftKVPress and press.base.gamma == 5.0 and press.base.allocator is None
    assert make_press("mixkv", budget=16, base="snapkv", window_size=8).base.window_size == 8
    reference = MixKVPress.reference(budget=64)
    assert (reference.uniform_weight, reference.window_size) == (0.33, 32)
    with pytest.raises(ValueError, match="base must name an importance press"):
        make_press("mixkv", budget=64, base="full")
    with pytest.raises(ValueError, match="wraps no other press"):
        make_press("snapkv", budget=64, base="shiftkv")


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"mixing": "headwise"}, ValueError, "needs redundancy="),
        (
            {"redundancy": {"0-0-key": [0.5]}, "mixing": "online"},
            ValueError,
            "read by mixing='headwise' only",
        ),
        ({"mixing": "random"}, ValueError, "mixing must be"),
        ({"redundancy": {"0-0-key": [1.5]}}, ValueError, "not a cosine similarity in"),
        ({"redundancy": {"0-0-keys": [0.5]}}, ValueError, 'not of the form "<layer>-<head>-key"'),
        ({"redundancy": {"0-0-key": [0.5], "1-1-key": [0.5]}}, ValueError, r"missing, e.g. \['0-1-key'"),
        ({"redundancy": {"0-0-value": [0.5]}}, ValueError, "redundancy scores is empty"),
        ({"redundancy": {"0-0-key": []}}, ValueError, "non-empty list of floats"),
        ({"base": FullKVPress()}, TypeError, "base must be an mmshiftkv importance press"),
        ({"base": "snapkv"}, TypeError, "got str"),
        ({"base": SnapKVPress(window_size=8)}, ValueError, "base's window must be the one MixKV keeps"),
        (
            {"base": SnapKVPress(budget=9, allocator=AdaAllocator())},
            ValueError,
            "give the allocator to MixKVPress",
        ),
        ({"uniform_weight": 0}, ValueError, "uniform_weight must be > 0"),
        ({"uniform_weight": math.nan}, ValueError, "uniform_weight"),
        ({"intrinsic": "vnorm"}, ValueError, "intrinsic must be"),
        ({"allocation": "pooled"}, ValueError, "allocation must be"),
        ({"window_size": -1}, ValueError, "window_size"),
    ],
)
def test_bad_settings_raise_naming_the_field(fields: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        MixKVPress(budget=16, **fields)


def test_a_redundancy_file_for_another_model_is_refused_naming_it(tmp_path: Path):
    model, processor = tiny("qwen2.5-vl")
    path = redundancy_file(tmp_path / "qwen7b.json", layers=28, heads=4)
    press = MixKVPress(budget=8, redundancy=path)
    shapes = r"qwen7b.json.*28 layers x 4 KV heads, but the model has 2 KV layers x 2"
    with pytest.raises(ValueError, match=shapes), press(model):
        pass
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="redundancy file .*bad.json' must hold a JSON object"):
        MixKVPress(budget=8, redundancy=bad)


# ---------------------------------------------------------------- calibration
def test_redundancy_calibration_equals_a_plain_recomputation():
    """Per prompt and (layer, KV head): the mean cosine over pairs of distinct tokens of the cached keys
    (and values) of a plain prefill, computed from the full cosine matrix."""
    model, processor = tiny("qwen2.5-vl")
    conversations = [user_turn(QUESTION, image=synthetic_image(seed)) for seed in (0, 1)]
    scores = compute_redundancy_scores(model, processor, conversations)
    assert len(scores) == 2 * 2 * 2 and all(len(v) == 2 for v in scores.values())
    for p, conversation in enumerate(conversations):
        inputs = encode_messages(processor, [conversation])
        cache = DynamicCache()
        with torch.no_grad():
            model(**inputs, **cache_argument(model, cache))
        for layer in range(2):
            for kind in ("key", "value"):
                states = getattr(cache.layers[layer], f"{kind}s")[0].double()
                unit = F.normalize(states, dim=-1)
                n = unit.shape[1]
                pairwise = ((unit @ unit.transpose(-1, -2)).sum((-1, -2)) - n) / (n * (n - 1))
                for head in range(2):
                    assert math.isclose(
                        scores[f"{layer}-{head}-{kind}"][p], float(pairwise[head]), abs_tol=1e-6
                    )


def test_calibration_command_writes_a_redundancy_file_mixkv_reads(tmp_path: Path):
    model, processor = build_tiny_model("qwen2.5-vl")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "redundancy.json"
    args = [str(tmp_path / "model"), str(out), "--scores", "redundancy", "--n-images", "2", "--device", "cpu"]
    assert calibrate_main(args) == 0
    scores = load_redundancy_scores(out)
    assert sorted(scores) == sorted(
        f"{layer}-{head}-{kind}" for layer in range(2) for head in range(2) for kind in ("key", "value")
    )
    assert all(len(values) == 2 for values in scores.values())
    press = MixKVPress(budget=8, window_size=4, redundancy=out)
    inputs = make_inputs("qwen2.5-vl", processor, [QUESTION])
    prefill(model, inputs, press)
    assert press.stats.kept.eq(8).all()


def test_the_eval_command_builds_mixkv_with_its_redundancy_file(tmp_path: Path):
    path = redundancy_file(tmp_path / "redundancy.json")
    config = EvalConfig(model="m", presses=("full", "snapkv", "mixkv"), budgets=(16,), redundancy=str(path))
    runs = {run.press: run for run in plan_runs(config)}
    press = config.press_for(runs["mixkv"])
    assert type(press) is MixKVPress and press.mixing == "headwise" and press.budget == 16
    assert type(config.press_for(runs["snapkv"])) is SnapKVPress
    assert config.fingerprint({})["redundancy"] == str(path)
    assert "redundancy" not in EvalConfig(model="m").fingerprint({})  # older output directories resume
    plain = EvalConfig(model="m", presses=("mixkv",))
    assert plain.press_for(plan_runs(plain)[0]).mixing == "uniform"
    with pytest.raises(ValueError, match="read by the 'mixkv' press only"):
        EvalConfig(model="m", presses=("snapkv",), redundancy=str(path))
