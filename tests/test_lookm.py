"""LOOK-M: its score against the model's own attention, its selection and merge against the released code.

Oracles (``tests/data/lookm``, ``tests/data/meda``, see tests/test_merge.py): the released classes run
outside this repository on recorded fp32 tensors; ``kept_indices`` and the merged keys/values are theirs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.allocators import AdaAllocator
from mmshiftkv.cache import CompressedLayer, cache_argument, returned_cache
from mmshiftkv.models import get_adapter
from mmshiftkv.presses import LookMPress, PressUsageError, ScoringState, UnsupportedCacheError
from mmshiftkv.presses.attention import attention_column_sums
from mmshiftkv.registry import make_press
from mmshiftkv.testing import ALL_FAMILIES, QUESTION, build_tiny_model, greedy, make_inputs, tiny

DATA = Path(__file__).parent / "data"
VARIANTS = {
    "h2o": (None, False),
    "pivot_merge": ("pivot", False),
    "avg_merge": ("average", False),
    "weighted_merge": ("weighted", False),
    "text_prior_pivot_merge": ("pivot", True),
    "text_prior_avg_merge": ("average", True),
    "text_prior_weighted_merge": ("weighted", True),
}
LOOKM_FILES = sorted(path.name for path in (DATA / "lookm").glob("*.pt"))
#: MEDA's selections that keep a budget (in merge_image_inside its widened recent window keeps 175 of 301).
MEDA_FILES = ["merge_two_images_gqa.pt", "merge_ratio_one.pt"]
IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


class RecordingLookM(LookMPress):
    """LookMPress that keeps each layer's scores and the image mask it was given."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.recorded: dict[int, torch.Tensor] = {}
        self.image_masks: list[torch.Tensor | None] = []

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
        self.recorded[module.layer_idx] = scores
        self.image_masks.append(self.state.image_mask)
        return scores


def oracle_state(data: dict, heads: int) -> ScoringState:
    """A ScoringState for recorded tensors: batch 1, no padding, the oracle's image mask."""
    adapter = SimpleNamespace(n_kv_heads=heads, model=SimpleNamespace(config=SimpleNamespace()))
    return ScoringState(adapter=adapter, image_mask=data["image_mask"][None])


@pytest.mark.parametrize("name", LOOKM_FILES)
def test_accumulated_attention_equals_the_released_codes_input(name: str):
    data = torch.load(DATA / "lookm" / name, weights_only=True)
    keys = data["keys"]
    sums = attention_column_sums(data["queries"], keys, keys.shape[-1] ** -0.5)
    torch.testing.assert_close(sums, data["attention"].sum(-2), atol=1e-5, rtol=1e-5)


def released_cases() -> list[tuple[str, str, str]]:
    cases = []
    for folder, names in (("lookm", LOOKM_FILES), ("meda", MEDA_FILES)):
        for name in names:
            data = torch.load(DATA / folder / name, weights_only=True)
            cases += [
                (folder, name, v)
                for v in VARIANTS
                if f"{v}/kept_indices" in data or f"{v}/unchanged" in data["meta"]
            ]
    return cases


@pytest.mark.parametrize(("folder", "name", "variant"), released_cases())
def test_selection_and_merge_of_the_reference_preset_equal_the_released_code(
    folder: str, name: str, variant: str
):
    data = torch.load(DATA / folder / name, weights_only=True)
    meta = data["meta"]
    keys, values = data["keys"], data["values"]
    heads, seq_len = keys.shape[1], keys.shape[2]
    merging, text_prior = VARIANTS[variant]
    if folder == "lookm":
        ratios = dict(hh_ratio=meta["hh_ratio"], recent_ratio=meta["recent_ratio"])
        scores = data["attention"].sum(-2)
    else:  # MEDA: per-layer ratio r, hh = recent = int(t * r / 2); scores include the first decode token
        ratios = dict(hh_ratio=meta["layer_hh_ratio"], recent_ratio=meta["layer_recent_ratio"])
        scores = data["attention_score"][None]
    press = LookMPress.reference(merging=merging, text_prior=text_prior, **ratios)
    with press.scoring(oracle_state(data, heads)):
        counts = press.kept_counts(0, torch.tensor([seq_len]), None)
        if meta.get(f"{variant}/unchanged"):
            assert bool((counts >= seq_len).all())  # not compressed, as the released code
            return
        indices, lengths = press.select(scores, counts)
        released = data[f"{variant}/kept_indices"].sort(-1).values
        ours = indices[0].sort(-1).values
        if lengths.eq(released.shape[1]).all():
            assert torch.equal(ours, released)
            merged = press.merge(keys, values, indices, lengths, scores)
            kept_keys, kept_values = (
                merged
                if merged is not None
                else (
                    keys[0][torch.arange(heads)[:, None], ours][None],
                    values[0][torch.arange(heads)[:, None], ours][None],
                )
            )
            torch.testing.assert_close(kept_keys, data[f"{variant}/keys"], atol=1e-5, rtol=0)
            torch.testing.assert_close(kept_values, data[f"{variant}/values"], atol=1e-5, rtol=0)
            return
    # The released text prior keeps every text token (28 in text_exceeds_hh, where hh + recent = 12): ours
    # keeps the budget, the recent window and the best-scored text, a subset of the released set.
    recent = int(seq_len * meta["recent_ratio"])
    hh = int(seq_len * meta["hh_ratio"])
    assert text_prior and lengths.eq(hh + recent).all() and released.shape[1] > hh + recent
    text = torch.nonzero(~data["image_mask"][: seq_len - recent]).flatten()
    for h in range(heads):
        best_text = text[scores[0, h, text].topk(hh).indices]
        expected = torch.cat([best_text, torch.arange(seq_len - recent, seq_len)]).sort().values
        assert torch.equal(ours[h], expected)
        assert set(ours[h].tolist()) <= set(released[h].tolist())


def query_real(inputs: dict) -> torch.Tensor:
    return inputs["attention_mask"].bool()


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava", "glm4v", "gemma3"])
def test_score_is_the_accumulated_attention_of_the_models_own_softmax(family: str):
    """M-RoPE, plain RoPE, GLM's partial pairwise rotary, Gemma 3's bidirectional image blocks; padding."""
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, [QUESTION, "Short?"])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    press = RecordingLookM(budget=8)
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, DynamicCache()))
    assert press.recorded
    real = query_real(inputs)
    kv_heads = model.config.get_text_config().num_key_value_heads
    for layer_idx, scores in press.recorded.items():
        probs = attentions[layer_idx].float() * real[:, None, :, None]
        expected = probs.sum(2).view(2, kv_heads, -1, probs.shape[-1]).sum(2)
        for b in range(2):
            torch.testing.assert_close(scores[b][:, real[b]], expected[b][:, real[b]], atol=1e-4, rtol=1e-4)


def media_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    ids = {getattr(model.config, name, None) for name in IMAGE_TOKEN_FIELDS} - {None}
    return torch.isin(input_ids, torch.tensor(sorted(ids), dtype=input_ids.dtype))


def check_priority(press: RecordingLookM, inputs: dict, image: torch.Tensor, share: float) -> None:
    """Per (sample, KV head): the count, the recent window, text before image, each class by score."""
    real = query_real(inputs)
    for ordinal, layer_idx in enumerate(sorted(press.recorded)):
        scores, kept_counts, indices = (
            press.recorded[layer_idx],
            press.stats.kept[ordinal],
            press.stats.indices[ordinal],
        )
        for b in range(real.shape[0]):
            positions = torch.nonzero(real[b]).flatten()
            for h in range(scores.shape[1]):
                count = int(kept_counts[b, h])
                kept = set(indices[b, h, :count].tolist())
                window = set(positions[len(positions) - int(count * share) :].tolist())
                assert window <= kept and len(kept) == min(count, len(positions))
                others = [int(p) for p in positions if int(p) not in window]
                for cls in (~image[b], image[b]):
                    members = [p for p in others if bool(cls[p])]
                    kept_scores = [float(scores[b, h, p]) for p in members if p in kept]
                    evicted_scores = [float(scores[b, h, p]) for p in members if p not in kept]
                    if kept_scores and evicted_scores:
                        assert min(kept_scores) >= max(evicted_scores)
                text_evicted = any(p not in kept for p in others if not image[b, p])
                image_kept = any(p in kept for p in others if image[b, p])
                assert not (text_evicted and image_kept)


@pytest.mark.parametrize("budget", [16, 92])
def test_text_outranks_image_and_each_class_ranks_by_accumulated_attention(budget: int):
    family = "qwen2.5-vl"
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION])
    image = media_mask(model, inputs["input_ids"])
    press = RecordingLookM(budget=budget)
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, DynamicCache()))
    assert torch.equal(press.image_masks[0], image)
    check_priority(press, inputs, image, share=0.5)
    kept_images = [int(image[0, idx[0, 0]].sum()) for idx in press.stats.indices]
    # 87 text tokens: at B=16 no image token outside the window survives; at B=92 (46 + 46) the 41 text
    # tokens before the window leave 5 slots to image tokens.
    assert (max(kept_images) == 0) if budget == 16 else (min(kept_images) > 0)


def test_text_only_prompts_are_ranked_as_by_h2o():
    family = "llama"
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, [QUESTION, "Which colour is the box?"])
    kept = []
    for text_prior in (True, False):
        press = RecordingLookM(budget=12, text_prior=text_prior, merging=None)
        with torch.no_grad(), press(model):
            model(**inputs, **cache_argument(model, DynamicCache()))
        check_priority(press, inputs, torch.zeros_like(inputs["input_ids"], dtype=torch.bool), share=0.5)
        kept.append(press.stats.indices)
    assert all(torch.equal(a, b) for a, b in zip(*kept))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_generates_under_lookm_and_holds_exactly_the_budget(family: str):
    model, processor = tiny(family)
    adapter = get_adapter(model)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"])
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    press = make_press("lookm", budget=8)
    if returned_cache(plain) is None:  # a model-specific cache class (Qwen3.5 on transformers 5.2)
        with pytest.raises(UnsupportedCacheError), press(model):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        return
    with press(model):
        tokens = greedy(model, inputs, max_new_tokens=2)
    assert tokens.shape[0] == 2
    expected = torch.tensor(press.stats.prompt_tokens).clamp(max=8)
    for ordinal, module in enumerate(adapter.attention_modules):
        if getattr(module, "sliding_window", None):
            continue  # sliding-window layers keep their own window
        assert torch.equal(press.stats.kept[ordinal], expected[:, None].expand(-1, adapter.n_kv_heads))
    assert press.stats.bytes_after < press.stats.bytes_before


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llama"])
def test_batched_lookm_equals_one_by_one(family: str):
    model, processor = tiny(family)
    questions = [QUESTION, "Read it.", "Which colour is the box at the top left corner?"]
    batched = make_inputs(family, processor, questions)
    pad = (~query_real(batched)).sum(-1)
    for press in (
        LookMPress(budget=10),
        LookMPress(budget=14, allocator=AdaAllocator(window=4), merging="average"),
    ):
        with press(model):
            together = greedy(model, batched, max_new_tokens=4)
        kept, indices = press.stats.kept, press.stats.indices
        for i, question in enumerate(questions):
            with press(model):
                alone = greedy(
                    model, make_inputs(family, processor, [question], image_seeds=[i]), max_new_tokens=4
                )
            assert torch.equal(together[i, : alone.shape[1]], alone[0])
            assert torch.equal(kept[:, i], press.stats.kept[:, 0])
            for layer, alone_indices in enumerate(press.stats.indices):
                if alone_indices is None:
                    continue
                for h in range(alone_indices.shape[1]):
                    n = int(kept[layer, i, h])
                    assert torch.equal(indices[layer][i, h, :n] - pad[i], alone_indices[0, h, :n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_merge_like_float32(dtype: torch.dtype):
    from mmshiftkv.presses.merge import merge_evicted

    family = "qwen2.5-vl"
    model, processor = build_tiny_model(family, dtype=dtype)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"])
    full, cache = DynamicCache(), DynamicCache()
    press = LookMPress(budget=12, merging="weighted")
    with torch.no_grad():
        model(**inputs, **cache_argument(model, full))
        with press(model):
            model(**inputs, **cache_argument(model, cache))
            assert greedy(model, inputs, max_new_tokens=2).shape[0] == 2
    key_mask = query_real(inputs)
    for layer, compressed in enumerate(cache.layers):
        assert isinstance(compressed, CompressedLayer) and compressed.dtype == dtype
        indices, lengths = press.stats.indices[layer], press.stats.kept[layer]
        keys, values = full.layers[layer].keys, full.layers[layer].values
        reference_keys, reference_values = merge_evicted(
            keys.float(), values.float(), indices, lengths, key_mask, rule="weighted"
        )
        stored_keys, stored_values = compressed.buckets[0].keys, compressed.buckets[0].values
        assert stored_keys.dtype == dtype and torch.isfinite(stored_keys).all()
        tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(stored_keys.float(), reference_keys, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(stored_values.float(), reference_values, atol=tolerance, rtol=tolerance)


def test_a_prompt_given_as_embeddings_is_refused_by_the_text_prior_unless_the_model_has_no_image_tokens():
    model, processor = tiny("llava")
    tokenizer = processor.tokenizer
    ids = tokenizer([QUESTION], return_tensors="pt").input_ids
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(PressUsageError, match="no input_ids"), torch.no_grad(), LookMPress(budget=8)(model):
        model(inputs_embeds=embeds, **cache_argument(model, DynamicCache()))
    press = LookMPress(budget=8, text_prior=False)
    with torch.no_grad(), press(model):
        model(inputs_embeds=embeds, **cache_argument(model, DynamicCache()))
    assert press.stats.compressed
    text_model, text_tokenizer = tiny("llama")
    text_ids = text_tokenizer([QUESTION], return_tensors="pt").input_ids
    press = LookMPress(budget=8)
    with torch.no_grad(), press(text_model):
        text_model(
            inputs_embeds=text_model.get_input_embeddings()(text_ids),
            **cache_argument(text_model, DynamicCache()),
        )
    assert press.stats.compressed


def test_reference_preset_keeps_the_released_budget_rule():
    press = LookMPress.reference()
    assert (press.hh_ratio, press.recent_ratio, press.merging, press.released_merge) == (
        0.1,
        0.1,
        "pivot",
        True,
    )
    assert LookMPress.reference(text_prior=False).n_sink == 4
    assert LookMPress.reference(text_prior=False, merging=None).n_sink == 0
    assert LookMPress.reference(budget=64).hh_ratio is None
    with press.scoring(ScoringState(adapter=SimpleNamespace(n_kv_heads=2))):
        # int(36 * 0.1) + int(36 * 0.1) = 6; int(105 * 0.1) * 2 = 20; short prompts keep at least one token.
        counts = press.kept_counts(0, torch.tensor([36, 105, 4]), None)
    assert counts[:, 0].tolist() == [6, 20, 1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 8, "merging": "max"}, ValueError, "merging must be one of pivot, average, weighted"),
        ({"budget": 8, "text_prior": 1}, TypeError, "text_prior must be True or False"),
        ({"budget": 8, "recent_share": 1.5}, ValueError, r"recent_share must be in \[0, 1\]"),
        ({"budget": 8, "n_sink": -1}, ValueError, "n_sink must be >= 0"),
        ({"budget": 8, "merging": None, "released_merge": True}, ValueError, "set merging as well"),
        ({"hh_ratio": 0.1}, ValueError, "give both hh_ratio and recent_ratio"),
        ({"hh_ratio": 0.1, "recent_ratio": 1.2}, ValueError, r"recent_ratio must be in \[0, 1\]"),
        ({"hh_ratio": 0.1, "recent_ratio": 0.1, "budget": 8}, ValueError, "do not pass budget"),
    ],
)
def test_bad_fields_raise_clear_errors(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        LookMPress(**kwargs)
