"""Scoring functions for the paper's benchmarks, one plain function per published metric.

Every function here reproduces the scoring that lmms-eval applies at commit ``75571cfe`` of
https://github.com/EvolvingLMMs-Lab/lmms-eval (2026-08-06, after release v0.7.2), which in turn
follows the benchmarks' official scripts. Where lmms-eval and the official definition disagree the
docstring says which one is followed and why.

============================  =========================================  =======================
function                      benchmark                                  per-sample value
============================  =========================================  =======================
:func:`anls`                  DocVQA                                     in [0, 1]
:func:`vqa_accuracy`          TextVQA (EvalAI answer processing)         in {0, 1/3, .., 1}
:func:`relaxed_accuracy`      ChartQA                                    0 or 1
:func:`ocrbench_match`        OCRBench (HME100k rule included)           0 or 1
:func:`cider_d`               TextCaps (corpus-level, pycocoevalcap)     >= 0 (COCO scale, x10)
:func:`mmmu_correct`          MMMU (official answer parser)              bool
============================  =========================================  =======================
"""

from __future__ import annotations

import math
import random
import re
import shutil
from collections.abc import Mapping, Sequence

from rapidfuzz.distance import Levenshtein

__all__ = [
    "OCRBENCH_CATEGORIES",
    "anls",
    "cider_d",
    "eval_mmmu_multi_choice",
    "eval_mmmu_open",
    "extract_numbers",
    "levenshtein_distance",
    "mmmu_choice_info",
    "mmmu_correct",
    "normalize_mmmu_answer",
    "normalize_vqa_answer",
    "ocrbench_match",
    "parse_mmmu_multi_choice_response",
    "parse_mmmu_open_response",
    "relaxed_accuracy",
    "vqa_accuracy",
]


def _check_references(references: Sequence[str] | str, metric: str) -> list[str]:
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs:
        raise ValueError(f"{metric} needs at least one reference answer, got an empty list")
    if not all(isinstance(r, str) for r in refs):
        raise TypeError(f"{metric} references must be strings, got {[type(r).__name__ for r in refs]}")
    return refs


# --------------------------------------------------------------------------------------------------
# DocVQA: Average Normalized Levenshtein Similarity
# --------------------------------------------------------------------------------------------------


def levenshtein_distance(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions; each costs 1) between two strings.

    Computed by ``rapidfuzz`` (C++, bit-parallel), fast on long DocVQA answers.
    """
    return Levenshtein.distance(a, b)


def anls(prediction: str, references: Sequence[str] | str, threshold: float = 0.5) -> float:
    """ANLS of one prediction against the question's reference answers (DocVQA).

    Both strings are lower-cased and their whitespace runs collapsed to one space; the normalised
    Levenshtein distance ``NL = dist / max(len(ref), len(pred))`` uses the lengths of the strings
    *before* that normalisation, as the DocVQA/ST-VQA script (and lmms-eval) do. The similarity
    ``1 - NL`` is maximised over the references and set to 0 when it is below ``threshold``; a
    similarity of exactly ``threshold`` is kept (lmms-eval's ``< threshold`` test).

    Parameters
    ----------
    prediction : str
        The model's answer.
    references : sequence of str or str
        The reference answers (at least one).
    threshold : float
        Similarities below it count as 0. Default 0.5 (the DocVQA definition).

    Returns
    -------
    float
        The score in [0, 1].
    """
    refs = _check_references(references, "ANLS")
    pred_norm = " ".join(prediction.lower().split())
    best = 0.0
    for ref in refs:
        ref_norm = " ".join(ref.lower().split())
        # the official script measures the raw strings' lengths (upper-cased, which only matters
        # for the rare characters whose upper case is longer, e.g. German sharp s)
        length = max(len(ref.upper()), len(prediction.upper()))
        distance = 0.0 if length == 0 else levenshtein_distance(ref_norm, pred_norm) / length
        best = max(best, 1.0 - distance)
    return 0.0 if best < threshold else best


# --------------------------------------------------------------------------------------------------
# TextVQA: VQA accuracy with EvalAI's answer processing
# --------------------------------------------------------------------------------------------------

# The VQA/EvalAI contraction table (apostrophe-less spelling -> canonical form). Entries whose key
# holds a capital letter or maps to itself in the official table are left out: answers are
# lower-cased before the lookup, so those entries can never change an answer.
_CONTRACTIONS: dict[str, str] = dict(
    re.findall(
        r"(\S+?)=(\S+)",
        """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
    maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
    mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
    ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
    she'dve=she'd've shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
    shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
    somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
    someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
    somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
    therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
    theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
    we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
    whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
    whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
    whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
    wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
    y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
    youll=you'll youre=you're youve=you've
    """,
    )
)
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# '?' and ',' are also in the official list but are already deleted by the first step.
_VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    "!",
)
# The official pattern is r"(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a look-ahead (a typo for a
# look-behind) that never blocks a match, so every period not followed by a digit is removed.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI's answer processing for VQA/TextVQA (applied to predictions and references alike).

    In order: lower-case; delete ``,`` and ``?``; split ``'s`` into `` 's``; turn newlines and
    tabs into spaces and strip; for each punctuation mark, delete it where it touches a space in
    the text and replace it by a space otherwise; delete periods not followed by a digit; map
    number words zero..ten (and "none") to digits; drop the articles a/an/the; restore
    contractions (``dont`` -> ``don't``); join the words with single spaces.

    (The official step that deletes rather than spaces punctuation when the text holds a
    digit-comma-digit group can never fire here, since commas are deleted first.)
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for mark in _VQA_PUNCTUATION:
        touches_space = (mark + " " in text) or (" " + mark in text)
        spaced = spaced.replace(mark, "" if touches_space else " ")
    spaced = _PERIOD_NOT_BEFORE_DIGIT.sub("", spaced)
    words = []
    for word in spaced.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQA v2 and TextVQA).

    Prediction and references go through :func:`normalize_vqa_answer`. For each reference ``i``,
    the accuracy against the *other* references is ``min(1, #matches / 3)``; the score is the mean
    over ``i`` (the official average over the 10-choose-9 subsets).

    Returns
    -------
    float
        The score in [0, 1]; with 10 references one of 0, 0.3, 0.6, 0.9, 1 (rounded).
    """
    refs = [normalize_vqa_answer(r) for r in _check_references(references, "VQA accuracy")]
    pred = normalize_vqa_answer(prediction)
    matches = sum(ref == pred for ref in refs)
    per_subset = []
    for ref in refs:
        others_matching = matches - (ref == pred)
        per_subset.append(min(1.0, others_matching / 3.0))
    return math.fsum(per_subset) / len(per_subset)


# --------------------------------------------------------------------------------------------------
# ChartQA: relaxed accuracy
# --------------------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, max_relative_change: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (Methani et al. 2020; ChartQA paper Sec. 5.1; lmms-eval).

    If both strings parse as numbers (Python ``float``; a trailing ``%`` divides by 100) and the
    target is non-zero, the prediction is correct when ``|pred - target| / |target| <=
    max_relative_change``. Otherwise the two strings must be equal ignoring case. The strings are
    not stripped (as in lmms-eval), so ``"12%"`` vs ``"12"`` compares 0.12 with 12 and fails.

    Returns
    -------
    float
        1.0 if correct else 0.0.
    """
    pred_value = _to_float(prediction)
    target_value = _to_float(target)
    if pred_value is not None and target_value:
        return float(abs(pred_value - target_value) / abs(target_value) <= max_relative_change)
    return float(prediction.lower() == target.lower())


# --------------------------------------------------------------------------------------------------
# OCRBench
# --------------------------------------------------------------------------------------------------

OCRBENCH_CATEGORIES: tuple[str, ...] = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
"""OCRBench's ten question types (the ``question_type`` column), 50x6 + 200x3 + 100 = 1000 items."""


def _fold_fullwidth(text: str) -> str:
    # fullwidth ASCII (U+FF01..U+FF5E) and the ideographic space to their ASCII forms, nothing else
    return "".join(
        chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else (" " if c == "\u3000" else c) for c in text
    )


def ocrbench_match(prediction: str, answers: Sequence[str] | str, dataset_name: str) -> int:
    """OCRBench's per-question score: 1 if some reference answer occurs inside the prediction.

    For ``dataset_name == "HME100k"`` (handwritten math) the comparison is case-sensitive and
    ignores all spaces: newlines become spaces and then every space is removed from both strings.
    For every other source the strings are stripped, lower-cased and newlines become spaces; both
    also have fullwidth ASCII folded to ASCII (lmms-eval's fix of 2026-07-30).

    Parameters
    ----------
    prediction : str
        The model's answer (stripped here).
    answers : sequence of str or str
        Accepted answers (the dataset's ``answer`` column).
    dataset_name : str
        The item's source dataset (the ``dataset`` column), which selects the rule.

    Returns
    -------
    int
        1 or 0. The benchmark's score is the number of correct items out of 1000.
    """
    refs = _check_references(answers, "OCRBench")
    pred = prediction.strip()
    if dataset_name == "HME100k":
        pred_key = pred.replace("\n", " ").replace(" ", "")
        return int(any(ref.strip().replace("\n", " ").replace(" ", "") in pred_key for ref in refs))
    pred_key = _fold_fullwidth(pred).lower().strip().replace("\n", " ")
    return int(any(_fold_fullwidth(ref).lower().strip().replace("\n", " ") in pred_key for ref in refs))


# --------------------------------------------------------------------------------------------------
# TextCaps: CIDEr-D through pycocoevalcap
# --------------------------------------------------------------------------------------------------


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D of captions, computed exactly as the COCO caption toolkit does.

    Captions and references are tokenised by the Stanford PTB tokenizer of ``pycocoevalcap``
    (lower-cased, punctuation dropped; needs ``java`` on the PATH) and scored by its ``Cider``
    scorer, which is CIDEr-D: tf-idf n-gram vectors (n = 1..4) with document frequencies taken
    over this corpus's references, clipped cosine similarity, Gaussian length penalty
    (sigma = 6), mean over n, mean over references, times 10. Because the idf comes from the
    corpus, scores of a subset differ from the scores of the same items inside the full set.

    Parameters
    ----------
    predictions : sequence of str
        One generated caption per image, length ``num_images``.
    references : sequence of sequence of str
        The reference captions of each image, length ``num_images``.

    Returns
    -------
    tuple of (float, list of float)
        The corpus score (mean of the per-image scores; 1.0 here is "100 CIDEr") and the per-image
        scores, in input order.

    Raises
    ------
    ImportError
        When ``pycocoevalcap`` is not installed.
    RuntimeError
        When ``java`` is not on the PATH.
    """
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise ImportError("CIDEr (TextCaps) needs pycocoevalcap: pip install 'mmshiftkv[eval]'") from err
    if shutil.which("java") is None:
        raise RuntimeError("CIDEr (TextCaps) needs Java for pycocoevalcap's PTB tokenizer; no `java` on PATH")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("CIDEr needs at least one caption")
    for i, refs in enumerate(references):
        _check_references(refs, f"CIDEr (image {i})")

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    _, per_image = Cider().compute_score(gts, res)
    per_image = [float(s) for s in per_image]
    return math.fsum(per_image) / len(per_image), per_image


# --------------------------------------------------------------------------------------------------
# MMMU: the official answer parser and evaluation
# --------------------------------------------------------------------------------------------------


def mmmu_choice_info(options: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Letters for a multiple-choice question's options: ``({"A": opt0, ...}, ["A", "B", ...])``."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return dict(zip(letters, options)), letters


def parse_mmmu_multi_choice_response(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], rng: random.Random
) -> str:
    """Extract the chosen letter from a free-form multiple-choice answer (MMMU's official parser).

    After stripping the outer punctuation ``, . ! ? ; : '`` (one mark kind at a time, in that
    order) and padding the response with a space on each side, candidates are searched in turn:
    letters in brackets ``(B)``; else letters followed by a space ``B ``; else letters followed by
    a period ``B.`` (lmms-eval's addition); else, for responses of more than 5 words, options whose
    text occurs in the response (case-insensitive). With several candidates the one occurring last
    wins; with none, a uniformly random letter is drawn from ``rng`` (the official script draws
    from the unseeded global generator; a seeded ``rng`` keeps runs reproducible).

    Returns
    -------
    str
        One of ``all_choices``.
    """
    for mark in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(mark)
    response = f" {response} "

    candidates = [c for c in all_choices if f"({c})" in response]
    found_by = "bracket" if candidates else None
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
        found_by = "letter" if candidates else None
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
        found_by = "letter" if candidates else None
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        found_by = "content" if candidates else None

    if not candidates:
        return rng.choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    if found_by == "bracket":
        positions = [response.rfind(f"({c})") for c in candidates]
    elif found_by == "letter":
        positions = [response.rfind(f" {c} ") for c in candidates]
    else:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    # first candidate among equal positions, as numpy.argmax in the official code
    return candidates[positions.index(max(positions))]


_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(text: str) -> list[str]:
    """All numbers in ``text``, as MMMU's official regexes find them.

    Returned in three groups, each in text order: comma-grouped numbers (``1,234``), scientific
    notation (``1.5e-3``), then plain integers/decimals not part of the previous two forms.
    """
    return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_PLAIN.findall(text)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_mmmu_answer(text: str) -> list[str | float]:
    """MMMU's ``normalize_str``: numbers become floats rounded to 2 decimals, text is lower-cased.

    A single character ``x`` becomes ``[" x", "x "]`` so that it only matches as a separate word.
    """
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]
    return [text]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_KEYS = frozenset({":", ",", ".", "!", "?", ";", "'"})


def parse_mmmu_open_response(response: str) -> list[str | float]:
    """Candidate answers of a free-form open answer (MMMU's official ``parse_open_response``).

    The lower-cased response is split into lines; in each line the shortest tail after one of the
    indicators ``could be / so / is / thus / therefore / final / answer / result`` (and ``=`` in
    the last line) is a key response; without any key response the whole response is one. The
    candidates are the key responses plus every number found in them, each normalised by
    :func:`normalize_mmmu_answer`, without duplicates (first-seen order; the official code returns
    a set, whose order never affects :func:`eval_mmmu_open`).
    """
    # the official code also splits at r"\.\s(?=[A-Z])", which cannot match after lower-casing
    lines = response.strip().strip(".").lower().split("\n")
    key_responses = []
    for index, line in enumerate(lines):
        indicators = _KEY_INDICATORS + (("=",) if index == len(lines) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_KEYS:
            key_responses.append(shortest)
    if not key_responses:
        key_responses = [response.strip().strip(".").lower()]

    candidates = list(key_responses)
    for key in key_responses:
        candidates.extend(extract_numbers(key))
    normalised = [value for candidate in candidates for value in normalize_mmmu_answer(candidate)]
    return list(dict.fromkeys(normalised))


def eval_mmmu_multi_choice(gold: str | Sequence[str], pred: str) -> bool:
    """A parsed letter is correct when it equals the gold letter (or one of several)."""
    return pred == gold if isinstance(gold, str) else pred in gold


def eval_mmmu_open(gold: str | Sequence[str], preds: Sequence[str | float]) -> bool:
    """An open answer is correct when a numeric candidate equals a numeric gold value (2 decimals)
    or a normalised gold string occurs inside a string candidate."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm_golds = [value for g in golds for value in normalize_mmmu_answer(g)]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in norm_golds):
                return True
        elif pred in norm_golds:
            return True
    return False


def mmmu_correct(
    response: str,
    question_type: str,
    answer: str | Sequence[str],
    options: Sequence[str],
    rng: random.Random,
) -> bool:
    """Score one MMMU response: parse it (multiple-choice or open) and compare with the answer.

    Parameters
    ----------
    response : str
        The model's free-form answer.
    question_type : str
        ``"multiple-choice"`` or ``"open"`` (the dataset's ``question_type``).
    answer : str or sequence of str
        The gold letter(s) or gold open answer(s).
    options : sequence of str
        The option texts (unused for open questions).
    rng : random.Random
        Draws the letter when a multiple-choice response names none.
    """
    if question_type == "multiple-choice":
        index2ans, all_choices = mmmu_choice_info(options)
        letter = parse_mmmu_multi_choice_response(response, all_choices, index2ans, rng)
        return eval_mmmu_multi_choice(answer, letter)
    return eval_mmmu_open(answer, parse_mmmu_open_response(response))
