"""Metric functions against hand-computed values from the published definitions.

Every expected number below was worked out by hand from the metric's definition (the derivation
is in the comment next to it), not by running the code under test.
"""

from __future__ import annotations

import importlib.util
import math
import random
import shutil
import sys
from collections import Counter

import pytest

from mmshiftkv.evaluation import metrics

# --------------------------------------------------------------------------------------------------
# ANLS (DocVQA)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),
        ("abc", "", 3),
        ("same", "same", 0),
        ("ab", "ba", 2),  # a transposition costs two edits (no Damerau)
        ("invoice", "Invoice", 1),  # case counts (ANLS lower-cases before)
        ("€100", "100", 1),  # characters, not bytes
        ("a" * 300 + "b", "a" * 300 + "c", 1),  # long strings (beyond one 64-bit block)
        ("x" * 150, "y" * 100, 150),  # 100 substitutions + 50 deletions
    ],
)
def test_levenshtein_distance(a: str, b: str, distance: int) -> None:
    assert metrics.levenshtein_distance(a, b) == distance


def test_anls_exact_match_ignores_case_and_whitespace_runs() -> None:
    assert metrics.anls("The  Cat", ["the cat"]) == 1.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("abcdef", 0.6),  # distance 4 to "abcdefghij", NL = 4/10, 1 - NL = 0.6 > 0.5: kept
        ("abcde", 0.5),  # NL = 5/10 exactly: lmms-eval keeps a similarity equal to the threshold
        ("abcd", 0.0),  # NL = 6/10, similarity 0.4 < 0.5: zeroed
    ],
)
def test_anls_threshold_around_one_half(prediction: str, expected: float) -> None:
    assert metrics.anls(prediction, ["abcdefghij"]) == pytest.approx(expected)


def test_anls_takes_the_best_reference() -> None:
    # "abce" is 1 edit from "abcd" (NL 1/4 -> 0.75); "xyz" is 4 edits (NL 4/4 -> 0)
    assert metrics.anls("abcd", ["xyz", "abce"]) == pytest.approx(0.75)
    assert metrics.anls("abcd", "abce") == pytest.approx(0.75)


def test_anls_empty_prediction() -> None:
    assert metrics.anls("", ["abc"]) == 0.0  # distance 3, length 3
    assert metrics.anls("", [""]) == 1.0  # both empty: NL defined as 0


def test_anls_uses_raw_lengths_like_the_official_script() -> None:
    # normalised "ab" vs "abcd": distance 2; the divisor is the raw length max(4, len("  ab  ")=6)
    assert metrics.anls("  ab  ", ["abcd"]) == pytest.approx(1 - 2 / 6)


def test_anls_rejects_no_references() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.anls("x", [])


# --------------------------------------------------------------------------------------------------
# VQA accuracy (TextVQA)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Cat.", "cat"),  # lower case, period dropped, article dropped
        ("Two dogs!", "2 dogs"),  # number word, '!' not touching a space -> space, then collapsed
        ("an apple", "apple"),
        ("a dog's toy", "dog 's toy"),  # "'s" split off
        ("dont", "don't"),  # contraction restored
        ("3.5", "3.5"),  # period before a digit kept
        ("1,000", "1000"),  # commas deleted
        ("e-mail", "e mail"),  # '-' inside a word -> space
        ("coca - cola", "coca cola"),  # '-' touching a space -> deleted
        ("U.S.A.", "usa"),  # periods not followed by a digit deleted
        ("  yes?\n", "yes"),
        ("none", "0"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw: str, normalised: str) -> None:
    assert metrics.normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize(
    ("matches", "expected"),
    # k of 10 humans gave the answer. Leaving out a matching human: min(1, (k-1)/3); leaving out
    # another one: min(1, k/3); mean over the 10 leave-one-out subsets.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    references = ["stop"] * matches + ["go"] * (10 - matches)
    assert metrics.vqa_accuracy("stop", references) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction_and_references() -> None:
    # "The STOP!" and "stop", "a stop" all normalise to "stop": 3 matches -> 0.9
    references = ["stop", "a stop", "Stop.", "halt", "halt", "halt", "halt", "halt", "halt", "halt"]
    assert metrics.vqa_accuracy("The STOP!", references) == pytest.approx(0.9)


def test_vqa_accuracy_empty_prediction() -> None:
    assert metrics.vqa_accuracy("", ["yes"] * 10) == 0.0


# --------------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("12", "12.5", 1.0),  # |12 - 12.5| / 12.5 = 0.04
        ("11.8", "12.5", 0.0),  # 0.7 / 12.5 = 0.056
        ("105", "100", 1.0),  # exactly 5%: inclusive
        ("94.9", "100", 0.0),  # 5.1%
        ("12%", "12%", 1.0),
        ("12.5%", "12%", 1.0),  # 0.125 vs 0.12: 4.2%
        ("0.12", "12%", 1.0),  # '%' divides by 100: 0.12 vs 0.12
        ("12%", "12", 0.0),  # 0.12 vs 12
        ("Yes", "yes", 1.0),  # non-numeric: exact match ignoring case
        ("yes.", "yes", 0.0),
        ("0", "0", 1.0),  # zero target: falls back to string equality
        ("0.0", "0", 0.0),
        ("", "12", 0.0),  # empty prediction
        (" 12", "12", 1.0),  # float() accepts surrounding spaces
    ],
)
def test_relaxed_accuracy(prediction: str, target: str, expected: float) -> None:
    assert metrics.relaxed_accuracy(prediction, target) == expected


# --------------------------------------------------------------------------------------------------
# OCRBench
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answers", "dataset", "expected"),
    [
        ("The word is HELLO", ["hello"], "IIIT5K", 1),  # lower-cased substring
        ("hel lo", ["hello"], "IIIT5K", 0),  # spaces matter outside HME100k
        ("a dog", ["cat", "dog"], "IIIT5K", 1),  # any reference
        ("ＨＥＬＬＯ", ["hello"], "IIIT5K", 1),  # fullwidth folded to ASCII
        ("", ["hello"], "IIIT5K", 0),  # empty prediction
        ("line one line two", ["line one\nline two"], "FUNSD", 1),  # newline -> space
        ("x ^ { 2 }", ["x^{2}"], "HME100k", 1),  # HME100k: every space removed
        ("a\nb", ["ab"], "HME100k", 1),
        ("X^{2}", ["x^{2}"], "HME100k", 0),  # HME100k: case-sensitive
        ("X^{2}", ["x^{2}"], "IIIT5K", 1),
    ],
)
def test_ocrbench_match(prediction: str, answers: list[str], dataset: str, expected: int) -> None:
    assert metrics.ocrbench_match(prediction, answers, dataset) == expected


def test_ocrbench_categories_total_1000() -> None:
    sizes = [50] * 6 + [200] * 3 + [100]  # the benchmark's published composition
    assert len(metrics.OCRBENCH_CATEGORIES) == 10
    assert sum(sizes) == 1000


# --------------------------------------------------------------------------------------------------
# CIDEr-D (TextCaps)
# --------------------------------------------------------------------------------------------------

needs_cider = pytest.mark.skipif(
    shutil.which("java") is None or importlib.util.find_spec("pycocoevalcap") is None,
    reason="pycocoevalcap (the eval extra) and Java are needed",
)


def _reference_cider_d(candidates: list[str], references: list[list[str]], sigma: float = 6.0) -> list[float]:
    """CIDEr-D written from Vedantam et al. (2015) and the coco-caption description, for
    pre-tokenised lower-case text: tf-idf n-gram vectors, idf from the references' document
    frequencies, clipped dot product / norms, Gaussian length penalty, x10 / #refs."""

    def ngrams(sentence: str, n: int) -> Counter:
        words = sentence.split()
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    num_images = len(references)
    doc_freq: Counter = Counter()
    for refs in references:
        doc_freq.update({g for ref in refs for n in range(1, 5) for g in ngrams(ref, n)})

    def vector(sentence: str, n: int) -> dict:
        return {
            g: tf * (math.log(num_images) - math.log(max(1.0, doc_freq[g])))
            for g, tf in ngrams(sentence, n).items()
        }

    scores = []
    for candidate, refs in zip(candidates, references):
        total = 0.0
        for ref in refs:
            delta = len(candidate.split()) - len(ref.split())
            per_n = []
            for n in range(1, 5):
                vc, vr = vector(candidate, n), vector(ref, n)
                dot = sum(min(vc[g], vr.get(g, 0.0)) * vr.get(g, 0.0) for g in vc)
                norm_c = math.sqrt(sum(v * v for v in vc.values()))
                norm_r = math.sqrt(sum(v * v for v in vr.values()))
                sim = dot / (norm_c * norm_r) if norm_c and norm_r else dot
                per_n.append(sim * math.exp(-(delta**2) / (2 * sigma**2)))
            total += sum(per_n) / 4
        scores.append(10.0 * total / len(refs))
    return scores


@needs_cider
def test_cider_exact_captions_score_ten() -> None:
    # Two images with disjoint vocabularies: every n-gram has df 1, idf log 2 > 0; a caption equal
    # to the reference has cosine 1 for n = 1..4 and no length penalty -> 10 * mean(1,1,1,1) = 10.
    # Case and punctuation are removed by the PTB tokenizer first.
    refs = [["a red stop sign here"], ["two cats sleep on sofa"]]
    corpus, per_image = metrics.cider_d(["A red stop sign, here.", "two cats sleep on sofa"], refs)
    assert per_image == pytest.approx([10.0, 10.0])
    assert corpus == pytest.approx(10.0)


@needs_cider
def test_cider_matches_plain_reimplementation() -> None:
    references = [
        ["a man holds a sign that says stop", "man with a stop sign", "a person holding a red sign"],
        ["a bottle of coca cola on a table", "a coke bottle on the table", "a red bottle of soda"],
        ["the clock shows ten past two", "a clock on a tower", "a large clock reading two ten"],
    ]
    candidates = ["a man holding a stop sign", "a bottle of coke on a table", "a clock"]
    corpus, per_image = metrics.cider_d(candidates, references)
    expected = _reference_cider_d(candidates, references)
    assert per_image == pytest.approx(expected, rel=1e-9)
    assert corpus == pytest.approx(sum(expected) / 3, rel=1e-9)


@needs_cider
def test_cider_empty_and_unrelated_predictions_score_zero() -> None:
    refs = [["a red stop sign here"], ["two cats sleep on sofa"]]
    _, per_image = metrics.cider_d(["", "two cats sleep on sofa"], refs)
    assert per_image == pytest.approx([0.0, 10.0])
    _, per_image = metrics.cider_d(["blue whale", "green tree"], refs)
    assert per_image == [0.0, 0.0]


def test_cider_without_pycocoevalcap_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(ImportError, match=r"pip install 'mmshiftkv\[eval\]'"):
        metrics.cider_d(["a"], [["a"]])


# --------------------------------------------------------------------------------------------------
# MMMU parsing and evaluation
# --------------------------------------------------------------------------------------------------

OPTIONS = ["red fox", "blue whale", "green frog", "brown bear"]


def _parse_choice(response: str, seed: int = 0) -> str:
    index2ans, choices = metrics.mmmu_choice_info(OPTIONS)
    return metrics.parse_mmmu_multi_choice_response(response, choices, index2ans, random.Random(seed))


def test_mmmu_choice_info() -> None:
    index2ans, choices = metrics.mmmu_choice_info(["x", "y", "z"])
    assert choices == ["A", "B", "C"]
    assert index2ans == {"A": "x", "B": "y", "C": "z"}


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The answer is (B).", "B"),  # bracketed letter
        ("B", "B"),  # bare letter, padded with spaces -> "B "
        ("C.", "C"),  # trailing period stripped
        ("Answer: D", "D"),
        ("(A) is wrong, the correct one is (C)", "C"),  # several brackets: the last one
        ("I think A is wrong, so B", "B"),  # several bare letters: the last one
        ("The correct option is the blue whale in the picture", "B"),  # > 5 words: option text
    ],
)
def test_mmmu_multi_choice_parsing(response: str, letter: str) -> None:
    assert _parse_choice(response) == letter


def test_mmmu_multi_choice_without_answer_draws_from_rng() -> None:
    draws = [_parse_choice("", seed) for seed in range(200)]
    assert set(draws) == {"A", "B", "C", "D"}
    assert draws == [_parse_choice("", seed) for seed in range(200)]  # reproducible per seed
    assert _parse_choice("no idea", 3) == random.Random(3).choice(["A", "B", "C", "D"])


def test_extract_numbers_follows_the_official_regexes() -> None:
    # comma group "1,234"; scientific "2.5e3"; plain numbers: "234" (after the comma), "2" (before
    # ".5e3", whose ".5" is followed by an exponent), "3" (the exponent), "-7", ".5"
    text = "Costs 1,234 or 2.5e3 and -7 or .5"
    assert metrics.extract_numbers(text) == ["1,234", "2.5e3", "234", "2", "3", "-7", ".5"]


@pytest.mark.parametrize(
    ("text", "normalised"),
    [("1,234.567", [1234.57]), (" Paris ", ["paris"]), ("A", [" a", "a "]), ("3", [3.0])],
)
def test_normalize_mmmu_answer(text: str, normalised: list) -> None:
    assert metrics.normalize_mmmu_answer(text) == normalised


def test_parse_mmmu_open_response_by_hand() -> None:
    # Only the whole response loses its final period. Line 1: tail after "is " -> "12 m/s." (its
    # period stays); line 2 (last, "=" allowed): tails "the final answer is 12" (so), "12" (is),
    # "answer is 12" (final), "is 12" (answer) -> shortest "12". Numbers found in the keys: "12",
    # "12". Normalised and deduplicated: "12 m/s.", 12.0.
    parsed = metrics.parse_mmmu_open_response("The speed is 12 m/s.\nSo the final answer is 12.")
    assert parsed == ["12 m/s.", 12.0]


@pytest.mark.parametrize(
    ("response", "gold", "correct"),
    [
        ("The answer is 3.5", "3.50", True),  # numeric: equal after rounding to 2 decimals
        ("x = 12", "12", True),  # "=" indicator in the last line
        ("It costs 1,234 dollars", "1234", True),  # comma-grouped number
        ("Therefore, the answer is Paris.", "Paris", True),  # string: gold inside candidate
        ("The answer is London", "Paris", False),
        ("The answer is 3.6", "3.5", False),
        ("", "5", False),  # empty response
        ("The answer is 7", ["6", "7"], True),  # several gold answers
    ],
)
def test_mmmu_open_evaluation(response: str, gold: str | list[str], correct: bool) -> None:
    assert metrics.mmmu_correct(response, "open", gold, [], random.Random(0)) is correct


def test_mmmu_multi_choice_evaluation() -> None:
    rng = random.Random(0)
    assert metrics.mmmu_correct("The answer is (B).", "multiple-choice", "B", OPTIONS, rng)
    assert not metrics.mmmu_correct("The answer is (C).", "multiple-choice", "B", OPTIONS, rng)
    assert metrics.mmmu_correct("C", "multiple-choice", ["B", "C"], OPTIONS, rng)
