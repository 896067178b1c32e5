"""Benchmark task definitions for the paper's Tables 1-3, following lmms-eval.

Each task is a small dataclass (a :class:`TaskSpec`) that says where the data is, how a dataset
row becomes a prompt (text + images, or chat messages), how many tokens to generate, how the
generated text is cleaned, how one prediction is scored, and how the per-sample records combine
into the number the paper reports.

Reference: lmms-eval commit ``75571cfe`` (https://github.com/EvolvingLMMs-Lab/lmms-eval, 2026-08-06,
after v0.7.2); task configs ``docvqa_val``, ``ocrbench``, ``textvqa_val``, ``chartqa``,
``textcaps_val``, ``mmmu_val`` with their ``default`` prompt variant (the one every model without
its own entry gets, which includes Qwen2-VL, Qwen2.5-VL and the LLaVA family).

Dataset ids: lmms-eval moved its copies from the ``lmms-lab`` to the ``lmms-lab-encoder``
organisation on 2026-07-30 (commit ``4be7ee0e``). The defaults here are the new ids; pass
``dataset_org="lmms-lab"`` to :func:`get_task` (or any ``dataset_id=``) to use the old ones.
OCRBench was never under lmms-lab: it loads from ``echo840/OCRBench``.

A scoring record (:meth:`TaskSpec.score`) is a JSON-serialisable dict holding everything
:meth:`TaskSpec.aggregate` needs, so a runner can write records as they are produced and
aggregate later (or in another process) without the dataset rows.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
from PIL import Image

from mmshiftkv.evaluation import metrics

__all__ = [
    "ChartQATask",
    "DocVQATask",
    "MMMUTask",
    "OCRBenchTask",
    "TASKS",
    "TaskSpec",
    "TextCapsTask",
    "TextVQATask",
    "get_task",
    "load_task_dataset",
]

Row = Mapping[str, Any]
Record = dict[str, Any]
Message = dict[str, Any]

# lmms-eval leaves `until` at the task default, the few-shot delimiter "\n\n", unless a task sets it.
_DEFAULT_STOP_STRINGS: tuple[str, ...] = ("\n\n",)


def load_task_dataset(
    dataset_id: str,
    split: str,
    dataset_config: str | None = None,
    limit: int | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Load one split with ``datasets.load_dataset``, optionally keeping only its first rows.

    Parameters
    ----------
    dataset_id : str
        A hub id (``"lmms-lab-encoder/DocVQA"``) or anything ``load_dataset`` accepts as ``path``,
        e.g. a local directory of parquet files named ``<split>-*.parquet``.
    split : str
        The split name.
    dataset_config : str, optional
        The dataset configuration (``name=`` of ``load_dataset``); None for none.
    limit : int, optional
        Keep the first ``limit`` rows (lmms-eval's ``--limit``: no shuffling).
    **load_kwargs
        Passed to ``datasets.load_dataset`` (``cache_dir``, ``token``, ``revision``...).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    dataset = datasets.load_dataset(dataset_id, dataset_config, split=split, **load_kwargs)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset


_BASE_FIELDS = ("dataset_id", "split", "dataset_config", "max_new_tokens", "stop_strings", "seed")


def _mean(values: Sequence[float]) -> float:
    # fsum keeps the mean independent of record order (records may come from several processes)
    return math.fsum(values) / len(values)


def _check_records(records: Sequence[Mapping[str, Any]], task: str) -> None:
    if len(records) == 0:
        raise ValueError(f"{task}: cannot aggregate zero records")


@dataclass
class TaskSpec(ABC):
    """One benchmark: data location, prompt building, generation length, scoring, aggregation.

    Parameters
    ----------
    dataset_id : str
        Hub id or local path given to ``datasets.load_dataset``.
    split : str
        Split to evaluate.
    dataset_config : str or None
        ``load_dataset``'s configuration name (DocVQA needs ``"DocVQA"``; local folders need None).
    max_new_tokens : int
        Generation length limit (lmms-eval's ``generation_kwargs.max_new_tokens``). Decoding is
        greedy for every task.
    stop_strings : tuple of str
        The generated text is cut at the first occurrence of any of them (lmms-eval's ``until``).
    seed : int
        Seeds any randomness in scoring; only MMMU's parser draws (a random letter when a
        multiple-choice response names none), seeded per question so results do not depend on
        how samples are split among processes.
    """

    name: ClassVar[str]
    """Registry key (= the lmms-eval task name)."""
    display_name: ClassVar[str]
    """Column header in the paper's tables."""
    metric: ClassVar[str]
    """Name of the reported metric."""
    columns: ClassVar[tuple[str, ...]]
    """Dataset columns the task reads (checked when the split is loaded)."""

    dataset_id: str = ""
    split: str = ""
    dataset_config: str | None = None
    max_new_tokens: int = 32
    stop_strings: tuple[str, ...] = _DEFAULT_STOP_STRINGS
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("dataset_id", "split"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(f"{type(self).__name__}.{field} must be a str, got {value!r}")
            if not value:
                raise ValueError(f"{type(self).__name__}.{field} must not be empty")
        if self.dataset_config is not None and not isinstance(self.dataset_config, str):
            raise TypeError(f"dataset_config must be a str or None, got {self.dataset_config!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {type(self.max_new_tokens).__name__}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop_strings, str):
            raise TypeError("stop_strings must be a sequence of strings, not a single string")
        self.stop_strings = tuple(self.stop_strings)
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        # the prompt fields and flags of the subclasses: same type as their default
        for field in dataclasses.fields(self):
            if field.name in _BASE_FIELDS or not isinstance(field.default, (str, bool)):
                continue
            value = getattr(self, field.name)
            if type(value) is not type(field.default):
                raise TypeError(f"{field.name} must be a {type(field.default).__name__}, got {value!r}")

    def required_columns(self) -> tuple[str, ...]:
        """The columns a dataset of this task must have (:attr:`columns`, plus optional ones in use)."""
        return self.columns

    def load(self, limit: int | None = None, **load_kwargs: Any) -> datasets.Dataset:
        """This task's split through :func:`load_task_dataset`.

        Raises
        ------
        ValueError
            If the split lacks a column of :meth:`required_columns`, naming the missing and the
            present columns.
        """
        dataset = load_task_dataset(self.dataset_id, self.split, self.dataset_config, limit, **load_kwargs)
        missing = [column for column in self.required_columns() if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{self.name}: the {self.split!r} split of {self.dataset_id!r} has no column(s) "
                f"{', '.join(missing)} (it has {', '.join(dataset.column_names)}); a {self.display_name} "
                f"dataset needs {', '.join(self.required_columns())}"
            )
        return dataset

    @abstractmethod
    def build_prompt(self, row: Row) -> str:
        """The question text (lmms-eval's ``doc_to_text``), without any chat template."""

    def build_images(self, row: Row) -> list[Image.Image]:
        """The images of the row, RGB (lmms-eval's ``doc_to_visual``)."""
        return [row["image"].convert("RGB")]

    def build_messages(self, row: Row) -> list[Message]:
        """One user turn in the chat-template format of HF processors: the images, then the text.

        ``[{"role": "user", "content": [{"type": "image", "image": PIL}, ..., {"type": "text",
        "text": prompt}]}]``, as lmms-eval's chat models receive it for tasks without their own
        ``doc_to_messages``.
        """
        content: list[dict[str, Any]] = [{"type": "image", "image": img} for img in self.build_images(row)]
        content.append({"type": "text", "text": self.build_prompt(row)})
        return [{"role": "user", "content": content}]

    def postprocess(self, generated: str) -> str:
        """Cut the decoded generation at the first stop string and strip surrounding whitespace."""
        for stop in self.stop_strings:
            generated = generated.split(stop)[0]
        return generated.strip()

    @abstractmethod
    def score(self, prediction: str, row: Row) -> Record:
        """Score one post-processed prediction against the row's references.

        Returns a JSON-serialisable record with key ``"score"`` (the per-sample value, or None for
        corpus-level metrics) plus whatever :meth:`aggregate` needs.
        """

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Combine the records of all samples into ``{"score": <reported number>, "num_samples": n,
        ...breakdowns}``. The result does not depend on the records' order.

        Default: the mean per-sample score x 100; tasks with another rule override it."""
        _check_records(records, self.name)
        return {"score": 100.0 * _mean([r["score"] for r in records]), "num_samples": len(records)}


@dataclass
class DocVQATask(TaskSpec):
    """DocVQA validation, ANLS x 100 (lmms-eval ``docvqa_val``)."""

    name: ClassVar[str] = "docvqa_val"
    display_name: ClassVar[str] = "DocVQA"
    metric: ClassVar[str] = "ANLS"
    columns: ClassVar[tuple[str, ...]] = ("question", "answers", "image")

    dataset_id: str = "lmms-lab-encoder/DocVQA"
    split: str = "validation"
    dataset_config: str | None = "DocVQA"
    max_new_tokens: int = 32
    pre_prompt: str = ""
    post_prompt: str = "\nAnswer the question using a single word or phrase."

    def build_prompt(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}{self.post_prompt}"

    def score(self, prediction: str, row: Row) -> Record:
        return {"score": metrics.anls(prediction, list(row["answers"]))}


@dataclass
class OCRBenchTask(TaskSpec):
    """OCRBench, number of correct answers out of the 1000 questions (lmms-eval ``ocrbench``)."""

    name: ClassVar[str] = "ocrbench"
    display_name: ClassVar[str] = "OCRBench"
    metric: ClassVar[str] = "correct / 1000"
    columns: ClassVar[tuple[str, ...]] = ("question", "answer", "dataset", "question_type", "image")

    dataset_id: str = "echo840/OCRBench"
    split: str = "test"
    max_new_tokens: int = 128
    pre_prompt: str = ""
    post_prompt: str = ""

    def build_prompt(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question'].strip()}{self.post_prompt}"

    def score(self, prediction: str, row: Row) -> Record:
        correct = metrics.ocrbench_match(prediction, row["answer"], row["dataset"])
        return {"score": correct, "question_type": row["question_type"]}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """``score`` is the number correct (out of 1000 on the full benchmark; out of
        ``num_samples`` with a limit), plus the number correct per question type."""
        _check_records(records, self.name)
        result: dict[str, float] = {
            "score": sum(int(r["score"]) for r in records),
            "num_samples": len(records),
        }
        for category in metrics.OCRBENCH_CATEGORIES:
            result[category] = sum(int(r["score"]) for r in records if r["question_type"] == category)
        return result


@dataclass
class TextVQATask(TaskSpec):
    """TextVQA validation, VQA accuracy x 100 (lmms-eval ``textvqa_val``).

    lmms-eval sets no ``max_new_tokens`` for TextVQA, so the model class's default applies there
    (128 for its Qwen2-VL and chat Qwen2.5-VL classes, 1024 for LLaVA); 128 is used here. Answers
    are one word or phrase, so greedy decoding ends long before either limit.
    """

    name: ClassVar[str] = "textvqa_val"
    display_name: ClassVar[str] = "TextVQA"
    metric: ClassVar[str] = "VQA accuracy"
    columns: ClassVar[tuple[str, ...]] = ("question", "answers", "image")

    dataset_id: str = "lmms-lab-encoder/textvqa"
    split: str = "validation"
    max_new_tokens: int = 128
    stop_strings: tuple[str, ...] = ("ASSISTANT:",)
    pre_prompt: str = ""
    post_prompt: str = "\nAnswer the question using a single word or phrase."
    use_ocr_tokens: bool = False
    """Append ``"\\nReference OCR token: a, b, ..."`` from the row's ``ocr_tokens`` (lmms-eval's
    ``ocr`` option, off by default)."""

    def required_columns(self) -> tuple[str, ...]:
        return (*self.columns, "ocr_tokens") if self.use_ocr_tokens else self.columns

    def build_prompt(self, row: Row) -> str:
        ocr = f"\nReference OCR token: {', '.join(row['ocr_tokens'])}" if self.use_ocr_tokens else ""
        # str.capitalize also lower-cases the rest of the question, as lmms-eval's prompt does
        return f"{self.pre_prompt}{row['question'].capitalize()}{ocr}{self.post_prompt}"

    def score(self, prediction: str, row: Row) -> Record:
        return {"score": metrics.vqa_accuracy(prediction, list(row["answers"]))}


@dataclass
class ChartQATask(TaskSpec):
    """ChartQA test, relaxed accuracy x 100 over both splits (lmms-eval ``chartqa``)."""

    name: ClassVar[str] = "chartqa"
    display_name: ClassVar[str] = "ChartQA"
    metric: ClassVar[str] = "relaxed accuracy"
    columns: ClassVar[tuple[str, ...]] = ("question", "answer", "type", "image")

    dataset_id: str = "lmms-lab-encoder/ChartQA"
    split: str = "test"
    max_new_tokens: int = 16
    pre_prompt: str = ""
    post_prompt: str = "\nAnswer the question with a single word."

    def build_prompt(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}{self.post_prompt}"

    def score(self, prediction: str, row: Row) -> Record:
        return {"score": metrics.relaxed_accuracy(prediction, row["answer"]), "type": row["type"]}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """``score`` over all questions, plus ``human_split`` (type ``human_test``) and
        ``augmented_split`` (every other type), each x 100, when the split has samples."""
        result = super().aggregate(records)
        human = [r["score"] for r in records if r["type"] == "human_test"]
        augmented = [r["score"] for r in records if r["type"] != "human_test"]
        if human:
            result["human_split"] = 100.0 * _mean(human)
        if augmented:
            result["augmented_split"] = 100.0 * _mean(augmented)
        return result


@dataclass
class TextCapsTask(TaskSpec):
    """TextCaps validation, corpus CIDEr-D x 100 (lmms-eval ``textcaps_val``; needs the ``eval``
    extra and Java)."""

    name: ClassVar[str] = "textcaps_val"
    display_name: ClassVar[str] = "TextCaps"
    metric: ClassVar[str] = "CIDEr"
    columns: ClassVar[tuple[str, ...]] = ("image_id", "caption_str", "image")

    dataset_id: str = "lmms-lab-encoder/TextCaps"
    split: str = "val"
    max_new_tokens: int = 64
    prompt: str = "Provide a one-sentence caption for the provided image."

    def build_prompt(self, row: Row) -> str:
        return self.prompt

    def score(self, prediction: str, row: Row) -> Record:
        """No per-sample score: CIDEr's idf weights come from the whole evaluated corpus."""
        return {
            "score": None,
            "image_id": str(row["image_id"]),
            "prediction": prediction,
            "references": list(row["caption_str"]),
        }

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        _check_records(records, self.name)
        corpus, _ = metrics.cider_d([r["prediction"] for r in records], [r["references"] for r in records])
        return {"score": 100.0 * corpus, "num_samples": len(records)}


# MMMU's six disciplines and their 30 subjects (the subject is the middle part of a question id,
# e.g. "validation_Art_Theory_12").
_MMMU_DISCIPLINES: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}
_MMMU_ID = re.compile(r"^[^_]+_(.+?)_\d+$")
_MMMU_IMAGE_TAG = re.compile(r"<image \d+>")
_MMMU_OPEN_SCORING = ("official", "lmms-eval")


@dataclass
class MMMUTask(TaskSpec):
    """MMMU validation, accuracy x 100 with the official answer parser (lmms-eval ``mmmu_val``).

    Prompt: the question, then for multiple-choice questions the options as ``"A. text"`` lines,
    a blank line and :attr:`multiple_choice_prompt`; for open questions a blank line and
    :attr:`open_ended_prompt`. :meth:`build_prompt` keeps the ``<image N>`` tags as text and
    :meth:`build_images` lists the referenced images in tag order (lmms-eval's ``doc_to_text`` /
    ``doc_to_visual``); :meth:`build_messages` interleaves each image at its tag (lmms-eval's
    ``doc_to_messages``, used by its chat models such as Qwen2.5-VL).

    Open questions: lmms-eval since v0.4 (PR #724, 2025-06-23) passes only the first parsed
    candidate, converted to a string, to the official ``eval_open``, which then iterates over
    its characters, so every open question (about 6% of the validation split) is scored wrong.
    ``open_ended_scoring="official"`` (default) scores them as MMMU's own script and lmms-eval
    before v0.4 do; ``"lmms-eval"`` reproduces lmms-eval's current numbers (open questions count
    0; they stay in the denominator).
    """

    name: ClassVar[str] = "mmmu_val"
    display_name: ClassVar[str] = "MMMU"
    metric: ClassVar[str] = "accuracy"
    columns: ClassVar[tuple[str, ...]] = ("id", "question", "options", "question_type", "answer", "image_1")

    dataset_id: str = "lmms-lab-encoder/MMMU"
    split: str = "validation"
    max_new_tokens: int = 128
    multiple_choice_prompt: str = "Answer with the option's letter from the given choices directly."
    open_ended_prompt: str = "Answer the question using a single word or phrase."
    open_ended_scoring: str = "official"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.open_ended_scoring not in _MMMU_OPEN_SCORING:
            raise ValueError(
                f"open_ended_scoring must be one of {_MMMU_OPEN_SCORING}, got {self.open_ended_scoring!r}"
            )

    @staticmethod
    def _options(row: Row) -> list[str]:
        # the hub copy stores the option list as its Python repr
        options = row["options"]
        return list(ast.literal_eval(options)) if isinstance(options, str) else list(options)

    def _question_block(self, row: Row, mc_prompt: str, open_prompt: str) -> str:
        if row["question_type"] == "multiple-choice":
            options = "\n".join(f"{chr(ord('A') + i)}. {text}" for i, text in enumerate(self._options(row)))
            return f"{row['question']}\n{options}\n\n{mc_prompt}"
        return f"{row['question']}\n\n{open_prompt}"

    def build_prompt(self, row: Row) -> str:
        return self._question_block(row, self.multiple_choice_prompt, self.open_ended_prompt)

    def build_images(self, row: Row) -> list[Image.Image]:
        """The images whose ``<image N>`` tag occurs in the question or options, sorted by tag."""
        tags = set(_MMMU_IMAGE_TAG.findall(self._question_block(row, "", "")))
        columns = sorted(tag.strip("<>").replace(" ", "_") for tag in tags)
        return [row[column].convert("RGB") for column in columns]

    def build_messages(self, row: Row) -> list[Message]:
        """Text pieces and images interleaved at the ``<image N>`` tags (lmms-eval's chat format).

        As in lmms-eval, the text before the i-th tag precedes the i-th image of
        :meth:`build_images` (empty pieces dropped, pieces stripped), and the text after the last
        tag closes the turn.
        """
        images = self.build_images(row)
        pieces = _MMMU_IMAGE_TAG.split(self.build_prompt(row))
        content: list[dict[str, Any]] = []
        for i, image in enumerate(images):
            if i < len(pieces) - 1 and pieces[i].strip():
                content.append({"type": "text", "text": pieces[i].strip()})
            content.append({"type": "image", "image": image})
        content.append({"type": "text", "text": pieces[-1].strip()})
        return [{"role": "user", "content": content}]

    def score(self, prediction: str, row: Row) -> Record:
        match = _MMMU_ID.match(row["id"])
        if match is None:
            raise ValueError(f"MMMU id {row['id']!r} is not of the form '<split>_<Subject>_<number>'")
        question_type = row["question_type"]
        if question_type == "multiple-choice" or self.open_ended_scoring == "official":
            # seeded by question so the draw does not depend on sample order or sharding
            rng = random.Random(f"{self.seed}:{row['id']}")
            correct = metrics.mmmu_correct(prediction, question_type, row["answer"], self._options(row), rng)
        else:
            correct = False
        return {"score": int(correct), "subject": match.group(1), "question_type": question_type}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """``score``: accuracy x 100 over all questions (lmms-eval's instance-level average of the
        per-subject accuracies is the same number), plus the accuracy x 100 of each discipline
        that has samples."""
        _check_records(records, self.name)
        result: dict[str, float] = {
            "score": 100.0 * _mean([r["score"] for r in records]),
            "num_samples": len(records),
        }
        for discipline, subjects in _MMMU_DISCIPLINES.items():
            scores = [r["score"] for r in records if r["subject"] in subjects]
            if scores:
                result[discipline] = 100.0 * _mean(scores)
        return result


TASKS: dict[str, type[TaskSpec]] = {
    task.name: task for task in (DocVQATask, OCRBenchTask, TextVQATask, ChartQATask, TextCapsTask, MMMUTask)
}
"""Task classes by lmms-eval name, in the column order of the paper's tables."""

_NEW_ORG = "lmms-lab-encoder"


def get_task(name: str, dataset_org: str | None = None, **overrides: Any) -> TaskSpec:
    """Build a task by its lmms-eval name with optional field overrides.

    Parameters
    ----------
    name : str
        One of :data:`TASKS` (``docvqa_val``, ``ocrbench``, ``textvqa_val``, ``chartqa``,
        ``textcaps_val``, ``mmmu_val``).
    dataset_org : str, optional
        Replaces the ``lmms-lab-encoder`` organisation of the default dataset id (e.g.
        ``"lmms-lab"`` for the ids lmms-eval used before 2026-07-30). Ignored for OCRBench, whose
        id is not an lmms-lab one, and when ``dataset_id`` is given.
    **overrides
        Dataclass fields of the task (``dataset_id``, ``split``, ``dataset_config``,
        ``max_new_tokens``, ``seed``, prompts...).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    cls = TASKS[name]
    valid = {field.name for field in dataclasses.fields(cls)}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"{name} has no field(s) {sorted(unknown)}; fields: {sorted(valid)}")
    if dataset_org is not None and "dataset_id" not in overrides:
        default_id = cls.__dataclass_fields__["dataset_id"].default
        org, _, dataset = default_id.partition("/")
        if org == _NEW_ORG:
            overrides["dataset_id"] = f"{dataset_org}/{dataset}"
    return cls(**overrides)
