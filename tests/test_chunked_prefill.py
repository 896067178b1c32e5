"""Chunked prefill under every press equals a one-forward prefill (issue 22).

The reference is the same press over the same prompt prefilled in one forward: the kept token
indices per layer and KV head, the kept counts and the greedy tokens after compression must be
equal. Prompts: a left-padded batch of two, with an image split by the chunk boundaries where the
family has images; chunk sizes 1 and 7 (not dividing the prompt). Moments merged chunk by chunk are
checked against plain float64 statistics.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.allocators import MEDAAllocator, VLCacheAllocator
from mmshiftkv.cache import cache_argument, compressed_attention
from mmshiftkv.models import get_adapter
from mmshiftkv.presses import (
    CompressionSkippedWarning,
    ExternalScorerPress,
    LookMPress,
    PressUsageError,
    ShiftKVPress,
    SnapKVPress,
    VLCachePress,
)
from mmshiftkv.presses.chunked import ChunkedPrefill
from mmshiftkv.presses.moments import Moments
from mmshiftkv.presses.state import CompressionStats, ScoringState
from mmshiftkv.registry import PRESSES, make_allocator, make_press
from mmshiftkv.testing import QUESTION, capture_attention_calls, make_inputs, tiny

BUDGET = 8
CHUNKS = (1, 7)
BATCH = [QUESTION, "Short?"]
#: Presses that score a chunked prefill: every registered one.
CHUNKED = (
    "expected_attention",
    "full",
    "keydiff",
    "last_attn",
    "lookm",
    "mixkv",
    "shiftkv",
    "snapkv",
    "streaming_llm",
    "vlcache",
)


def fresh_press(name: str, **fields):
    if name == "vlcache":
        # The token scores; VL-Cache's own layer allocation is the whole-model allocators' test.
        fields.setdefault("allocator", "uniform")
    return make_press(name, budget=BUDGET, **fields) if name != "full" else make_press(name)


#: Scores of a chunked prefill equal one forward's within float32 rounding (sums over chunks and over
#: one forward's query blocks add in different orders; GEMMs block differently per platform).
SCORE_RTOL, SCORE_ATOL = 1e-4, 1e-5


@dataclass
class Run:
    """One prefill under a press and the greedy tokens after it: what it kept, and the scores it kept by."""

    tokens: torch.Tensor
    stats: CompressionStats
    #: Per KV layer scored (its ordinal), the masked scores ``(batch, kv_heads, seq_len)``.
    scores: dict[int, torch.Tensor]


@contextmanager
def recorded_scores(press) -> Iterator[dict[int, torch.Tensor]]:
    scores: dict[int, torch.Tensor] = {}
    masked_scores = press.masked_scores

    def recording(module, *args):
        scored = masked_scores(module, *args)
        scores[press.state.adapter.ordinal(module)] = scored.detach().clone()
        return scored

    press.masked_scores = recording
    try:
        yield scores
    finally:
        del press.masked_scores


def generate(model, inputs: dict, press, chunk: int | None) -> Run:
    extra = {} if chunk is None else {"prefill_chunk_size": chunk}
    with torch.no_grad(), warnings.catch_warnings(), recorded_scores(press) as scores, press(model):
        warnings.simplefilter("ignore", CompressionSkippedWarning)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, **extra)
    return Run(out[:, inputs["input_ids"].shape[1] :], press.stats, scores)


def near_tie_swaps(got: torch.Tensor, want: torch.Tensor, count: int, scores: torch.Tensor) -> int:
    """Tokens one selection of ``count`` kept and the other did not, checked to be near-tie swaps.

    The two kept sets (``got``, ``want``: index rows) may differ only by pairs of tokens whose scores
    (the one-forward ``scores`` of the row, where ``-inf`` marks padding) are equal within
    :data:`SCORE_RTOL` / :data:`SCORE_ATOL`: which of two nearly tied tokens is kept depends on rounding.
    """
    got, want = set(got[:count].tolist()), set(want[:count].tolist())
    added, dropped = sorted(got - want), sorted(want - got)
    assert len(added) == len(dropped)
    tolerance = SCORE_ATOL + SCORE_RTOL * float(scores[torch.isfinite(scores)].abs().max())
    added_scores = sorted(float(scores[i]) for i in added)
    dropped_scores = sorted(float(scores[i]) for i in dropped)
    for a, d in zip(added_scores, dropped_scores):
        assert abs(a - d) <= tolerance, f"kept {added} instead of {dropped}: scores {a} vs {d}"
    return len(added)


def assert_equal_to_one_forward(run: Run, reference: Run) -> None:
    """Scores within rounding; the same kept counts, kept tokens up to near-tie swaps, the same KV bytes;
    the same greedy tokens where the selections are the same."""
    stats, want = run.stats, reference.stats
    assert run.scores.keys() == reference.scores.keys()
    for layer, scores in reference.scores.items():
        torch.testing.assert_close(run.scores[layer], scores, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    assert (stats.layer_statistics is None) == (want.layer_statistics is None)
    if want.layer_statistics is not None:  # a whole-model allocator's (NaN: sliding-window layers)
        torch.testing.assert_close(
            stats.layer_statistics, want.layer_statistics, rtol=SCORE_RTOL, atol=SCORE_ATOL, equal_nan=True
        )
    assert torch.equal(stats.kept, want.kept)
    assert stats.prompt_tokens == want.prompt_tokens
    swaps = 0
    for ordinal, (got, expected) in enumerate(zip(stats.indices, want.indices)):
        assert (got is None) == (expected is None), f"layer {ordinal}"
        if expected is None or torch.equal(got, expected):
            continue
        scores = reference.scores[ordinal]
        for b, h in itertools.product(range(got.shape[0]), range(got.shape[1])):
            swaps += near_tie_swaps(got[b, h], expected[b, h], int(want.kept[ordinal, b, h]), scores[b, h])
    assert stats.bytes_after == want.bytes_after
    if swaps == 0:
        assert torch.equal(run.tokens, reference.tokens)


@functools.cache
def generate_chunks_correctly(family: str) -> bool:
    """Whether this transformers' own ``generate(prefill_chunk_size=...)`` (no press) matches one forward.

    transformers 5.2 gives every chunk the positions of the prompt's last tokens; a press refuses to
    score such a prefill (see ``check_chunk_positions``).
    """
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, BATCH)
    scores = []
    for extra in ({}, {"prefill_chunk_size": 7}):
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=1,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                **extra,
            )
        scores.append(out.scores[0])
    return bool(torch.allclose(scores[0], scores[1], atol=1e-4, rtol=0))


def image_split_by(chunk: int, model, inputs: dict) -> bool:
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    first, last = int(image.min()), int(image.max())
    return any(first < boundary <= last for boundary in range(chunk, inputs["input_ids"].shape[1], chunk))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("name", CHUNKED)
def test_generate_with_prefill_chunks_equals_one_forward(name: str, chunk: int):
    family = "qwen2.5-vl"
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, BATCH)
    assert image_split_by(chunk, model, inputs)
    reference = generate(model, inputs, fresh_press(name), None)
    if not generate_chunks_correctly(family):
        with pytest.raises(PressUsageError, match="wrong positions"):
            generate(model, inputs, fresh_press(name), chunk)
        return
    assert_equal_to_one_forward(generate(model, inputs, fresh_press(name), chunk), reference)


@pytest.mark.parametrize(
    ("name", "allocator"),
    [
        ("shiftkv", "ada"),
        ("snapkv", "ada"),
        ("expected_attention", "ada"),
        ("lookm", "ada"),
        ("vlcache", "ada"),
        ("snapkv", "pyramid"),
    ],
)
def test_chunked_prefill_under_a_per_layer_allocator_equals_one_forward(name: str, allocator: str):
    family = "qwen2.5-vl"
    if not generate_chunks_correctly(family):
        pytest.skip("this transformers' generate(prefill_chunk_size=...) runs chunks at wrong positions")
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, BATCH)
    reference = generate(
        model, inputs, fresh_press(name, allocator=make_allocator(allocator, window=4)), None
    )
    run = generate(model, inputs, fresh_press(name, allocator=make_allocator(allocator, window=4)), 7)
    assert_equal_to_one_forward(run, reference)


#: Presses under whole-model allocators (whose statistic is a ratio of per-query sums).
WHOLE_MODEL = [
    ("vlcache", {"allocator": "vlcache"}),
    ("lookm", {"merging": "average", "allocator": MEDAAllocator(entropy="prompt")}),
    ("snapkv", {"allocator": VLCacheAllocator(fallback_window=40, relative=False)}),
]


@pytest.mark.parametrize(("name", "fields"), WHOLE_MODEL)
def test_chunked_prefill_under_a_whole_model_allocator_equals_one_forward(name: str, fields: dict):
    family = "qwen2.5-vl"
    if not generate_chunks_correctly(family):
        pytest.skip("this transformers' generate(prefill_chunk_size=...) runs chunks at wrong positions")
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, BATCH)
    reference = generate(model, inputs, fresh_press(name, **fields), None)
    assert reference.stats.layer_statistics is not None
    assert_equal_to_one_forward(generate(model, inputs, fresh_press(name, **fields), 7), reference)


def manual_prefill(model, inputs: dict, press, chunk: int) -> Run:
    """Forwards of consecutive slices over one cache, after ``press.expect_prompt``; then 3 greedy steps."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    length = ids.shape[1]
    cache = DynamicCache()
    with torch.no_grad(), recorded_scores(press) as scores, press(model):
        press.expect_prompt(length)
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            logits = model(
                input_ids=ids[:, start:end],
                attention_mask=mask[:, :end],
                position_ids=positions[:, start:end],
                **cache_argument(model, cache),
            ).logits[:, -1]
    tokens, position = [], positions[:, -1:]
    with torch.no_grad(), compressed_attention(model):
        for _ in range(3):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            mask, position = torch.cat([mask, torch.ones_like(token)], -1), position + 1
            step = model(
                input_ids=token, attention_mask=mask, position_ids=position, **cache_argument(model, cache)
            )
            logits = step.logits[:, -1]
    return Run(torch.cat(tokens, -1), press.stats, scores)


MANUAL_PRESSES = [
    ("shiftkv", {}),
    ("shiftkv", {"statistics": "per_feature", "stats_window": 16}),
    ("snapkv", {"window_size": 12}),
    ("keydiff", {}),
    ("streaming_llm", {}),
    ("last_attn", {}),
    ("expected_attention", {}),
    ("mixkv", {"window_size": 4, "base": ShiftKVPress()}),
    ("lookm", {}),
    ("lookm", {"merging": None, "text_prior": False, "n_sink": 2}),
    ("mixkv", {"window_size": 4, "base": LookMPress()}),
    ("vlcache", {}),
    ("vlcache", {"fallback_window": 3, "kernel_size": 3}),
    *WHOLE_MODEL,
]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("name", "fields"), MANUAL_PRESSES)
def test_manual_chunked_prefill_equals_one_forward(name: str, fields: dict, chunk: int):
    model, processor = tiny("qwen2")
    inputs = make_inputs("qwen2", processor, BATCH)
    length = inputs["input_ids"].shape[1]
    assert length % chunk or chunk == 1
    reference = manual_prefill(model, inputs, fresh_press(name, **fields), length)
    assert reference.stats.compressed
    assert_equal_to_one_forward(manual_prefill(model, inputs, fresh_press(name, **fields), chunk), reference)


def test_gemma3_image_block_split_by_a_chunk_is_refused_and_unsplit_chunks_are_equal():
    family = "gemma3"
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, BATCH)
    length = inputs["input_ids"].shape[1]
    assert image_split_by(7, model, inputs) and not image_split_by(length - 2, model, inputs)
    if not generate_chunks_correctly("qwen2"):  # gemma3's own chunks of 7 split its image
        # transformers 5.2: chunks at wrong positions, refused before any block is looked at.
        with pytest.raises(PressUsageError, match="wrong positions"):
            generate(model, inputs, ShiftKVPress(budget=BUDGET), length - 2)
        return
    with pytest.raises(PressUsageError, match="splits a bidirectional attention block"):
        generate(model, inputs, ShiftKVPress(budget=BUDGET), 7)
    reference = generate(model, inputs, ShiftKVPress(budget=BUDGET), None)
    assert_equal_to_one_forward(generate(model, inputs, ShiftKVPress(budget=BUDGET), length - 2), reference)


@pytest.mark.parametrize(
    ("name", "fields"),
    [("lookm", {}), ("vlcache", {}), ("lookm", {"allocator": MEDAAllocator(entropy="prompt")})],
)
def test_attention_sums_over_gemma3_chunks_read_its_bidirectional_image_block(name: str, fields: dict):
    # The image block lies inside the first chunk: its queries see the whole block (the chunk's own mask).
    family = "gemma3"
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, BATCH)
    length = inputs["input_ids"].shape[1]
    if not generate_chunks_correctly("qwen2"):
        with pytest.raises(PressUsageError, match="wrong positions"):
            generate(model, inputs, fresh_press(name, **fields), length - 2)
        return
    reference = generate(model, inputs, fresh_press(name, **fields), None)
    assert_equal_to_one_forward(generate(model, inputs, fresh_press(name, **fields), length - 2), reference)


def test_every_registered_press_scores_chunks():
    # What refuses chunks is not a registered press: ExternalScorerPress (below), a refusing base.
    assert set(CHUNKED) == set(PRESSES)
    assert all(PRESSES[name].chunked_prefill_refusal is None for name in CHUNKED)


def test_whole_model_allocators_and_external_scorers_refuse_a_chunked_prefill():
    model, processor = tiny("qwen2")
    inputs = make_inputs("qwen2", processor, BATCH)
    press = ShiftKVPress(budget=BUDGET, allocator=make_allocator("meda"))
    with pytest.raises(
        PressUsageError, match="MEDAAllocator allocates from the cross-modal attention entropy"
    ):
        manual_prefill(model, inputs, press, 7)
    press = ExternalScorerPress(press=SnapKVPress(budget=BUDGET), budget=BUDGET)
    with pytest.raises(PressUsageError, match="ExternalScorerPress cannot score .*keyword arguments"):
        manual_prefill(model, inputs, press, 7)
    base = ExternalScorerPress(press=SnapKVPress(window_size=4))
    press = make_press("mixkv", budget=BUDGET, window_size=4, base=base)
    refusal = "MixKVPress cannot .*its base press ExternalScorerPress cannot"
    with pytest.raises(PressUsageError, match=refusal):
        manual_prefill(model, inputs, press, 7)


def test_misuse_of_a_manual_chunked_prefill_is_refused():
    model, processor = tiny("qwen2")
    inputs = make_inputs("qwen2", processor, [QUESTION])
    ids = inputs["input_ids"]
    press = SnapKVPress(budget=BUDGET)
    with pytest.raises(PressUsageError, match="inside `with press"):
        press.expect_prompt(ids.shape[1])
    with torch.no_grad(), press(model):
        with pytest.raises(ValueError, match="prompt_length"):
            press.expect_prompt(0)
        press.expect_prompt(ids.shape[1])
        cache = DynamicCache()
        model(input_ids=ids[:, :5], **cache_argument(model, cache))
        with pytest.raises(PressUsageError, match="under way"):
            press.expect_prompt(ids.shape[1])
        with pytest.raises(PressUsageError, match="stopped after 5 of"):
            model(input_ids=ids[:, 5:], **cache_argument(model, DynamicCache()))
    with torch.no_grad(), press(model):
        press.expect_prompt(ids.shape[1] - 1)
        with pytest.raises(PressUsageError, match="past the"):
            model(input_ids=ids, **cache_argument(model, DynamicCache()))
    with torch.no_grad(), pytest.warns(CompressionSkippedWarning, match="stopped after 5"), press(model):
        press.expect_prompt(ids.shape[1])
        model(input_ids=ids[:, :5], **cache_argument(model, DynamicCache()))


@pytest.mark.parametrize("pooled", [False, True])
def test_moments_merged_over_chunks_equal_plain_statistics(pooled: bool):
    generator = torch.Generator().manual_seed(0)
    values = 50.0 + torch.randn(2, 23, 6, generator=generator)
    real = torch.ones(2, 23, dtype=torch.bool)
    real[1, :5] = False  # left padding
    values[1, :5] = float("nan")  # padding rows are left out whatever they hold
    merged = None
    for start in range(0, 23, 4):
        piece = Moments.of(values[:, start : start + 4], real[:, start : start + 4], pooled=pooled)
        merged = piece if merged is None else merged.merge(piece)
    mean, std = merged.mean_and_std()
    for sample in range(2):
        rows = values[sample, real[sample]].double()
        rows = rows.reshape(-1) if pooled else rows
        torch.testing.assert_close(mean[sample], rows.mean(0).float().reshape(mean[sample].shape))
        torch.testing.assert_close(std[sample], rows.std(0).float().reshape(std[sample].shape))


def test_covariance_moments_merged_over_chunks_equal_plain_covariance():
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(1, 17, 3, 4, generator=generator)  # (batch, tokens, heads, head_dim)
    merged = None
    for start in range(0, 17, 5):
        piece = Moments.of(values[:, start : start + 5], covariance=True)
        merged = piece if merged is None else merged.merge(piece)
    for head in range(3):
        rows = values[0, :, head].double()
        centered = rows - rows.mean(0)
        torch.testing.assert_close(merged.m2[0, head], centered.T @ centered, atol=1e-5, rtol=1e-5)


def held_across_chunks(monkeypatch, press, chunk: int) -> tuple[list[int], Run]:
    """``ChunkedPrefill.nbytes`` after every layer of every chunk of a manual chunked prefill (tiny qwen2)."""
    model, processor = tiny("qwen2")
    inputs = make_inputs("qwen2", processor, BATCH)
    held: list[int] = []
    add_layer = ChunkedPrefill.add_layer

    def measured(self, *args):
        add_layer(self, *args)
        held.append(self.nbytes)

    monkeypatch.setattr(ChunkedPrefill, "add_layer", measured)
    return held, manual_prefill(model, inputs, press, chunk)


def prompt_bytes(batch: int, length: int) -> int:
    """Per prompt: int64 positions, bool padding mask, bool image/video token mask."""
    return batch * length * (8 + 1 + 1)


def test_state_kept_across_chunks_is_trailing_rows_statistics_and_positions(monkeypatch):
    held, _ = held_across_chunks(monkeypatch, ShiftKVPress(budget=BUDGET), 7)
    model, processor = tiny("qwen2")
    config, (batch, length) = model.config, make_inputs("qwen2", processor, BATCH)["input_ids"].shape
    assert length % 7 == 3
    # Per layer: whole chunks of attention-input rows until they hold the last 8 (the rotation check's;
    # ShiftKV reads 1): the last chunks of 7 and 3 tokens, float32; global moments (count, mean, M2:
    # float64 per sample).
    per_layer = batch * (7 + 3) * config.hidden_size * 4 + 3 * batch * 8
    assert held[-1] == config.num_hidden_layers * per_layer + prompt_bytes(batch, length)


def test_lookm_state_across_chunks_is_one_float_per_key_and_kv_head(monkeypatch):
    held, _ = held_across_chunks(monkeypatch, LookMPress(budget=BUDGET), 7)
    model, processor = tiny("qwen2")
    config, (batch, length) = model.config, make_inputs("qwen2", processor, BATCH)["input_ids"].shape
    # Per layer: the trailing rows (as above: the last chunks of 7 and 3 tokens) and the running
    # accumulated attention, batch x kv_heads x length float32.
    rows = batch * (7 + 3) * config.hidden_size * 4
    per_layer = rows + batch * config.num_key_value_heads * length * 4
    assert held[-1] == config.num_hidden_layers * per_layer + prompt_bytes(batch, length)


def test_every_layer_scores_with_every_chunks_statistics(monkeypatch):
    # The prompt state is built at the last chunk's first layer; the later layers fold that chunk in
    # after it, and must score with it too.
    counts: dict[int, list[float]] = {}
    score = ShiftKVPress.score

    def recording(self, module, *args):
        counts[module.layer_idx] = self.state.accumulated(module).count.flatten().tolist()
        return score(self, module, *args)

    monkeypatch.setattr(ShiftKVPress, "score", recording)
    model, processor = tiny("qwen2")
    inputs = make_inputs("qwen2", processor, BATCH)
    manual_prefill(model, inputs, ShiftKVPress(budget=BUDGET), 7)
    # Global statistics: one count per sample, of its real tokens' hidden values.
    real = (inputs["attention_mask"].sum(-1) * model.config.hidden_size).tolist()
    assert counts == {layer: real for layer in range(model.config.num_hidden_layers)}


def test_vlcache_state_across_chunks_is_its_fallback_rows_and_post_vision_sums(monkeypatch):
    held, _ = held_across_chunks(monkeypatch, VLCachePress(budget=BUDGET), 7)
    model, processor = tiny("qwen2")
    config, (batch, length) = model.config, make_inputs("qwen2", processor, BATCH)["input_ids"].shape
    # Per layer: the fewest whole chunks holding the last fallback_window = 32 rows (chunks of 7 and a
    # last one of 3: 5 x 7 + 3 = 38 rows), float32; the post-vision attention so far, batch x kv_heads x
    # length float32, its query count (int64) and whether an image was seen (bool) per sample.
    rows = batch * 38 * config.hidden_size * 4
    per_layer = rows + batch * config.num_key_value_heads * length * 4 + batch * (8 + 1)
    assert held[-1] == config.num_hidden_layers * per_layer + prompt_bytes(batch, length)


def test_vlcache_post_vision_sums_restart_at_each_image_and_fall_back_at_the_end():
    """Fed by hand with image positions of our choosing: two images in one sample (the sums restart
    at the second), a prompt ending in an image in the other (its fallback window, from the rows kept);
    the reference is the press's score over the whole prompt in one go."""
    model, processor = tiny("qwen2")
    inputs = make_inputs("qwen2", processor, BATCH)
    calls, cache = capture_attention_calls(model, inputs)
    key_mask = inputs["attention_mask"].bool()
    batch, length = key_mask.shape
    assert bool(key_mask[0].all()) and int(key_mask[1].sum()) >= 4
    positions = torch.arange(length)[None].expand(batch, -1)  # the model's own (no position_ids given)
    images = torch.zeros(batch, length, dtype=torch.bool)
    images[0, 10:15] = images[0, 30:35] = True  # the second image starts in the chunk [28, 35)
    images[1, -2:] = True  # ends in an image: no post-vision tokens
    press = VLCachePress(budget=BUDGET, fallback_window=3)
    adapter = get_adapter(model)
    chunked = ChunkedPrefill(press, adapter, length)
    for start in range(0, length, 7):
        end = min(start + 7, length)
        chunked.add_chunk(
            end - start, positions[:, start:end], key_mask[:, :end], media_mask=images[:, start:end]
        )
        for call in calls:
            keys = cache.layers[call["module"].layer_idx].keys[:, :, :end]
            chunked.add_layer(call["module"], call["hidden_states"][:, start:end], keys)
    whole = ScoringState(adapter=adapter, key_mask=key_mask, positions=positions, image_mask=images)
    for call in calls:
        module = call["module"]
        layer = cache.layers[module.layer_idx]
        with press.scoring(whole):
            want = press.score(module, call["hidden_states"], layer.keys, layer.values, None, {})
        with press.scoring(chunked.prompt_state()):
            rows = chunked.attention_input(module)
            got = press.score(module, rows, layer.keys, layer.values, None, {})
        assert rows.shape[1] < length
        torch.testing.assert_close(got, want, rtol=SCORE_RTOL, atol=SCORE_ATOL)
        summed = chunked.prompt_state().accumulated(module)
        assert summed.count.tolist() == [length - 35, 0] and summed.seen_image.tolist() == [True, True]


def test_whole_model_allocator_state_across_chunks_adds_four_numbers_per_sample_and_layer(monkeypatch):
    held, _ = held_across_chunks(monkeypatch, SnapKVPress(budget=BUDGET, allocator=VLCacheAllocator()), 7)
    model, processor = tiny("qwen2")
    config, (batch, length) = model.config, make_inputs("qwen2", processor, BATCH)["input_ids"].shape
    # Per layer: the rows for the allocator's fallback_window = 32 (SnapKV's window is smaller): 38, as
    # above; the allocator's sums (numerator, denominator: float64), query count (int64) and whether
    # an image was seen (bool) per sample. SnapKV itself keeps nothing else.
    per_layer = batch * 38 * config.hidden_size * 4 + batch * (8 + 8 + 8 + 1)
    assert held[-1] == config.num_hidden_layers * per_layer + prompt_bytes(batch, length)
