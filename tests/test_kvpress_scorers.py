"""Every kvpress ScorerPress under ExternalScorerPress, on both ends of the transformers range.

CI runs this file on transformers 5.2.0 (.venv-oldest, kvpress installed with its pin) and on the
newest release (.venv-kvpress: kvpress installed with ``--no-deps`` over the main venv). Two oracles:

- everywhere, the scorer's own ``score()`` recomputed on the tensors a plain forward hands each
  attention layer (with ``rotary_emb`` attached as kvpress attaches it and the ratio kvpress would
  need for the budget), then mmshiftkv's keep rule written out here;
- where kvpress's own ``with press(model):`` runs (its hook reads ``cache_position`` and
  ``past_key_values``, which transformers 5.4 / 5.24 no longer pass), kvpress's own compression:
  the keys kvpress keeps are the top-k of the scores it computed, and our kept set is our rule on
  those same scores (equal to kvpress's set whenever kvpress kept the last token).

The scorers that download (QFilter, KVzap, ExpectedAttentionStats) load tiny random filters / models /
statistics saved in the test's folder under the hub names kvpress asks for.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache

from mmshiftkv.testing import QUESTION, capture_attention_calls, kvpress_leftovers_removed, make_inputs, tiny

kvpress = pytest.importorskip("kvpress")

from kvpress.presses.expected_attention_with_stats import ExpectedAttentionStats  # noqa: E402
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel  # noqa: E402
from kvpress.presses.qfilter_press import QFilters  # noqa: E402

from mmshiftkv.cache import cache_argument  # noqa: E402
from mmshiftkv.presses import ExternalScorerPress  # noqa: E402

BUDGET = 16
#: The name the offline hub fixtures are saved under (kvpress derives its hub ids from it).
MODEL_NAME = "tiny-llama"

#: Every kvpress ScorerPress, configured for the 66-token tiny-Llama prompt (SnapKV's window below
#: the prompt length, LagKV's partitions short enough to score, sketches within the head size).
SCORERS: dict[str, Callable[[], object]] = {
    "KnormPress": lambda: kvpress.KnormPress(),
    "RandomPress": lambda: kvpress.RandomPress(seed=0),
    "KeyDiffPress": lambda: kvpress.KeyDiffPress(),
    "StreamingLLMPress": lambda: kvpress.StreamingLLMPress(),
    "ObservedAttentionPress": lambda: kvpress.ObservedAttentionPress(),
    "TOVAPress": lambda: kvpress.TOVAPress(),
    "SnapKVPress": lambda: kvpress.SnapKVPress(window_size=8),
    "PyramidKVPress": lambda: kvpress.PyramidKVPress(window_size=8),
    "ExpectedAttentionPress": lambda: kvpress.ExpectedAttentionPress(),
    "ExpectedAttentionStatsPress": lambda: kvpress.ExpectedAttentionStatsPress(stats_folder="exp_att_stats"),
    "QFilterPress": lambda: kvpress.QFilterPress(),
    "KVzapPress": lambda: kvpress.KVzapPress(model_type="mlp"),
    "LagKVPress": lambda: kvpress.LagKVPress(lag_size=4),
    "LeverageScorePress": lambda: kvpress.LeverageScorePress(sketch_dimension=8),
    "NonCausalAttnPress": lambda: kvpress.NonCausalAttnPress(chunk_size=32),
    "CURPress": lambda: kvpress.CURPress(),
    "CompactorPress": lambda: kvpress.CompactorPress(sketch_dimension=8, chunk_size=32),
    "CapPress": lambda: kvpress.CapPress(),
    "CriticalKVPress": lambda: kvpress.CriticalKVPress(kvpress.KnormPress()),
}


def test_every_kvpress_scorer_is_covered():
    exported = {
        name
        for name, obj in vars(kvpress).items()
        if inspect.isclass(obj) and issubclass(obj, kvpress.ScorerPress) and obj is not kvpress.ScorerPress
    }
    assert exported == set(SCORERS)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Tiny Q-filters, KVzap model and query statistics where kvpress looks for them (no download)."""
    config = tiny("llama")[0].config
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    monkeypatch.chdir(tmp_path)
    for model, _ in (tiny("llama"), tiny("llama", "eager")):
        monkeypatch.setattr(model.config, "name_or_path", MODEL_NAME)
    torch.manual_seed(0)
    # huggingface_hub and transformers load a local folder of the hub id's name before asking the hub.
    QFilters(layers, kv_heads, head_dim).save_pretrained(tmp_path / "nthngdy" / f"{MODEL_NAME}_qfilt")
    kvzap = KVzapModel(
        KVzapConfig(input_dim=config.hidden_size, output_dim=kv_heads, n_modules=layers, hidden_dim=16)
    )
    kvzap.save_pretrained(tmp_path / "nvidia" / f"KVzap-mlp-{MODEL_NAME}")
    stats = ExpectedAttentionStats(layers, heads, head_dim, "synthetic", MODEL_NAME, 1, 66, 4)
    factor = torch.randn(layers, heads, head_dim, head_dim) / head_dim
    stats.query_mean.data = torch.randn(layers, heads, head_dim)
    stats.query_cov.data = factor @ factor.transpose(-1, -2)
    stats.save_pretrained(tmp_path / "exp_att_stats")
    kvpress.QFilterPress.load_q_filters.cache_clear()
    yield
    kvpress.QFilterPress.load_q_filters.cache_clear()


def llama(name: str):
    """The tiny Llama (eager attention for the scorer that reads attention weights) and its prompt."""
    model, tokenizer = tiny("llama", "eager") if name == "ObservedAttentionPress" else tiny("llama")
    return model, make_inputs("llama", tokenizer, [QUESTION])


def our_rule(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """mmshiftkv's keep rule: the last token plus the best ``budget - 1`` others (ties to the earlier
    token), ascending."""
    seq_len = scores.shape[-1]
    ranked = torch.sort(-scores[..., :-1].float(), dim=-1, stable=True).indices[..., : budget - 1]
    last = torch.full((*scores.shape[:-1], 1), seq_len - 1)
    return torch.cat([ranked.sort(-1).values, last], dim=-1)


def compressed_indices(name: str, model, inputs: dict) -> list[torch.Tensor]:
    press = ExternalScorerPress(press=SCORERS[name](), budget=BUDGET)
    before = [getattr(layer.self_attn, "rotary_emb", None) for layer in model.model.layers]
    torch.manual_seed(0)  # LeverageScore and Compactor sketch with the global generator
    with torch.no_grad(), press(model):
        model(**inputs, **cache_argument(model, DynamicCache()))
    # The rotary_emb attached for the scorer is gone (a leftover of kvpress's own __call__ stays).
    assert [getattr(layer.self_attn, "rotary_emb", None) for layer in model.model.layers] == before
    return press.stats.indices


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_keeps_our_rule_on_its_own_scores(name: str, offline_hub, monkeypatch):
    model, inputs = llama(name)
    seq_len = inputs["input_ids"].shape[1]
    kept = compressed_indices(name, model, inputs)

    calls, cache = capture_attention_calls(model, inputs)
    scorer = SCORERS[name]()
    scorer.post_init_from_model(model)
    # What kvpress's __call__ sets up: the decoder's rotary embedding on every attention module, and
    # the ratio that keeps BUDGET tokens (int(seq_len * (1 - ratio)) == BUDGET).
    for layer in model.model.layers:
        monkeypatch.setattr(layer.self_attn, "rotary_emb", model.model.rotary_emb, raising=False)
    scorer.compression_ratio = 1 - (BUDGET + 0.5) / seq_len
    assert int(seq_len * (1 - scorer.compression_ratio)) == BUDGET
    torch.manual_seed(0)
    for layer_idx, call in enumerate(calls):
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        with torch.no_grad():
            scores = scorer.score(
                call["module"], call["hidden_states"], keys, values, call["attentions"], call["kwargs"]
            )
        torch.testing.assert_close(kept[layer_idx], our_rule(scores, BUDGET), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_keeps_our_rule_on_the_scores_of_kvpress_own_compression(
    name: str, offline_hub, kvpress_own_hooks_run
):
    model, inputs = llama(name)
    seq_len = inputs["input_ids"].shape[1]
    kept = compressed_indices(name, model, inputs)

    plain = DynamicCache()
    with torch.no_grad():
        model(**inputs, **cache_argument(model, plain))
    # Under ExternalScorerPress PyramidKV scores as SnapKV (the layer schedule is an allocator's job):
    # compare with the scores of kvpress's own PyramidKV run, whose per-layer counts differ.
    theirs = SCORERS[name]()
    theirs.compression_ratio = 1 - (BUDGET + 0.5) / seq_len
    scores: list[torch.Tensor] = []
    own_score = theirs.score
    theirs.score = lambda *args, **kwargs: scores.append(own_score(*args, **kwargs)) or scores[-1]
    cache = DynamicCache()
    torch.manual_seed(0)
    with torch.no_grad(), kvpress_leftovers_removed(model), theirs(model):
        model(**inputs, **cache_argument(model, cache))
    assert len(scores) == len(model.model.layers)
    for layer_idx, layer_scores in enumerate(scores):
        kvpress_keys = cache.layers[layer_idx].keys
        n_kept = kvpress_keys.shape[2]
        top = layer_scores.topk(n_kept, dim=-1).indices
        # kvpress kept exactly the top-k of the scores it computed ...
        full_keys = plain.layers[layer_idx].keys
        torch.testing.assert_close(kvpress_keys, full_keys.gather(2, top[..., None].expand_as(kvpress_keys)))
        # ... and under our budget the same scorer keeps our rule on those very scores.
        torch.testing.assert_close(kept[layer_idx], our_rule(layer_scores, BUDGET), rtol=0, atol=0)
        # Where kvpress kept the last token and no tie straddles its cut, the two kept sets are equal.
        ordered = layer_scores.sort(dim=-1, descending=True).values
        strict_cut = ordered[..., n_kept - 1] > ordered[..., n_kept]
        same = strict_cut & (top == seq_len - 1).any(-1) & (n_kept == BUDGET)
        assert torch.equal(kept[layer_idx][same], top.sort(-1).values[same])
