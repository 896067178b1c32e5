"""ExternalScorerPress without kvpress installed: what it sets up for a scorer, and what it refuses.

Scorers here are kvpress-shaped stand-ins (kvpress's own scorers are tested in
``tests/test_kvpress_scorers.py``); the oracles are computed by hand: RoPE tables from ``inv_freq``,
StreamingLLM's kept set, the positions the model gives its rotary embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.allocators import PyramidAllocator
from mmshiftkv.cache import cache_argument
from mmshiftkv.presses import BudgetedPress, ExternalScorerPress, PressUsageError
from mmshiftkv.testing import QUESTION, build_tiny_model, make_inputs

BUDGET = 16


@pytest.fixture(scope="module")
def untouched_llama():
    """A tiny Llama of its own, never given to kvpress (no ``rotary_emb`` left on its layers)."""
    model, tokenizer = build_tiny_model("llama")
    return model, make_inputs("llama", tokenizer, [QUESTION])


def rope_by_hand(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's default RoPE table at 1-D ``positions`` ``(n,)``: ``(n, head_dim)`` cos and sin."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@dataclass
class FutureRotaryScorer:
    """Calls ``module.rotary_emb`` with future positions, as kvpress's ExpectedAttention and CAP do."""

    compression_ratio: float = 0.0
    tables: list = field(default_factory=list)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        seq_len = keys.shape[2]
        cos, sin = module.rotary_emb(keys, torch.arange(seq_len, seq_len + 8)[None])
        self.tables.append((cos, sin))
        return -keys.norm(dim=-1)


def test_scorer_gets_the_decoders_rotary_embedding_and_the_model_is_left_as_it_was(untouched_llama):
    model, inputs = untouched_llama
    seq_len = inputs["input_ids"].shape[1]
    scorer = FutureRotaryScorer()
    with torch.no_grad(), ExternalScorerPress(press=scorer, budget=BUDGET)(model):
        model(**inputs, **cache_argument(model, DynamicCache()))
    assert len(scorer.tables) == len(model.model.layers)
    future = torch.arange(seq_len, seq_len + 8)
    expected_cos, expected_sin = rope_by_hand(model.model.rotary_emb.inv_freq, future)
    for cos, sin in scorer.tables:
        torch.testing.assert_close(cos[0].double(), expected_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[0].double(), expected_sin, atol=1e-6, rtol=0)
    assert not any(hasattr(layer.self_attn, "rotary_emb") for layer in model.model.layers)
    assert all(not layer.self_attn._forward_hooks for layer in model.model.layers)


def test_refusals_leave_no_rotary_embedding_behind(untouched_llama):
    model, inputs = untouched_llama
    # Refused before the prefill: another press already runs on the model.
    second = ExternalScorerPress(press=FutureRotaryScorer(), budget=BUDGET)
    with (
        ExternalScorerPress(press=FutureRotaryScorer(), budget=BUDGET)(model),
        pytest.raises(PressUsageError),
        second(model),
    ):
        pass
    # Refused inside the prefill: a right-padded batch.
    right_padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    right_padded["attention_mask"][:, -1] = 0
    with (
        pytest.raises(PressUsageError, match="right padding"),
        torch.no_grad(),
        ExternalScorerPress(press=FutureRotaryScorer(), budget=BUDGET)(model),
    ):
        model(**right_padded, **cache_argument(model, DynamicCache()))
    assert not any(hasattr(layer.self_attn, "rotary_emb") for layer in model.model.layers)


def test_a_rotary_embedding_left_by_kvpress_stays_and_a_layers_own_is_not_replaced(untouched_llama):
    model, inputs = untouched_llama
    first, second = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    own = torch.nn.Identity()
    first.rotary_emb = model.model.rotary_emb  # what kvpress's own __call__ leaves behind
    second.rotary_emb = own
    try:
        seen = []

        class Recorder(FutureRotaryScorer):
            def score(self, module, *args):
                seen.append(module.rotary_emb)
                return super().score(module, *args) if module is first else -args[1].norm(dim=-1)

        with torch.no_grad(), ExternalScorerPress(press=Recorder(), budget=BUDGET)(model):
            model(**inputs, **cache_argument(model, DynamicCache()))
        assert seen[0] is not model.model.rotary_emb and seen[1] is own
        assert first.rotary_emb is model.model.rotary_emb and second.rotary_emb is own
    finally:
        del first.rotary_emb, second.rotary_emb


@dataclass(kw_only=True)
class PositionRecordingPress(BudgetedPress):
    """Records the prompt positions each layer sees, after calling the shared rotary embedding itself."""

    seen: list = field(default_factory=list)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        self.seen.append(self.state.positions.clone())
        # A scorer calling the decoder's rotary embedding through __call__ with other positions.
        self.state.adapter.rotary_emb(hidden_states, torch.arange(1000, 1000 + keys.shape[2])[None])
        return -keys.norm(dim=-1)


def test_rotary_calls_made_while_scoring_do_not_replace_the_prompt_positions(untouched_llama):
    model, inputs = untouched_llama
    given: list[torch.Tensor] = []

    def record(module, args, kwargs):
        values = [*args, *kwargs.values()]
        given.append(next(v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point()))

    hook = model.model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
    press = PositionRecordingPress(budget=BUDGET)
    try:
        with torch.no_grad(), press(model):
            model(**inputs, **cache_argument(model, DynamicCache()))
    finally:
        hook.remove()
    prompt = given[0]  # the model's own call, before the first layer
    assert prompt.shape[-1] == inputs["input_ids"].shape[1]
    assert len(press.seen) == len(model.model.layers)
    for positions in press.seen:
        torch.testing.assert_close(positions, prompt)


@dataclass
class RatioReadingScorer:
    """kvpress's StreamingLLM rule: ones for the sinks and the kept recent tokens, zeros in between."""

    compression_ratio: float = 0.0
    n_sink: int = 4

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        seq_len = keys.shape[2]
        n_pruned = seq_len - int(seq_len * (1 - self.compression_ratio))
        scores = torch.ones_like(keys[..., 0])
        scores[:, :, self.n_sink : self.n_sink + n_pruned] = 0
        return scores


class StreamingLLMPress(RatioReadingScorer):
    """Named as kvpress's class: ExternalScorerPress knows it reads its ratio."""


@pytest.mark.parametrize("budget", [5, 16, 33])
def test_a_ratio_reading_scorer_gets_the_ratio_of_the_budget(untouched_llama, budget: int):
    model, inputs = untouched_llama
    seq_len = inputs["input_ids"].shape[1]
    scorer = StreamingLLMPress(compression_ratio=0.25)
    press = ExternalScorerPress(press=scorer, budget=budget)
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, DynamicCache()))
    # StreamingLLM: the 4 sinks and the budget - 4 most recent tokens, on every head of every layer.
    expected = torch.cat([torch.arange(4), torch.arange(seq_len - budget + 4, seq_len)])
    for indices in press.stats.indices:
        assert torch.equal(indices, expected.expand_as(indices))
    assert scorer.compression_ratio == 0.25  # restored after each call
    assert int(seq_len * (1 - press.equivalent_ratio(seq_len))) == budget


def test_a_ratio_reading_scorer_is_refused_under_an_allocator():
    with pytest.raises(ValueError, match="reads its compression_ratio inside score"):
        ExternalScorerPress(press=StreamingLLMPress(), budget=BUDGET, allocator=PyramidAllocator(window=4))
    ExternalScorerPress(press=RatioReadingScorer(), budget=BUDGET, allocator=PyramidAllocator(window=4))


def test_a_press_that_selects_tokens_itself_is_refused():
    class ScorerPress:  # kvpress's base of the presses that only score
        def score(self, *args):
            return None

    class FinchPress:  # has a score() but selects in compress(), like kvpress's FinchPress
        def score(self, *args):
            return None

        def compress(self, *args):
            return None

    class OwnCompression(ScorerPress):  # a ScorerPress with its own compress (PyramidKV) is a scorer
        def compress(self, *args):
            return None

    with pytest.raises(TypeError, match="FinchPress is a kvpress press that selects tokens itself"):
        ExternalScorerPress(press=FinchPress(), budget=BUDGET)
    ExternalScorerPress(press=OwnCompression(), budget=BUDGET)
