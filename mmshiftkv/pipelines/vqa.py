"""The ``"kv-press-vqa"`` pipeline: answer questions about images from a compressed KV cache."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Pipeline, ProcessorMixin
from transformers.pipelines import PIPELINE_REGISTRY

from mmshiftkv.cache import cache_argument, returned_cache
from mmshiftkv.cache.compat import prompt_cache_argument
from mmshiftkv.generation import generate_answers
from mmshiftkv.models.adapter import get_adapter
from mmshiftkv.presses.base import BudgetedPress
from mmshiftkv.presses.errors import UnsupportedCacheError
from mmshiftkv.presses.full_kv import FullKVPress
from mmshiftkv.validation import check_int

TASK = "kv-press-vqa"
QUESTION_MARK = "<<mmshiftkv-question>>"


@dataclass
class VQARequest:
    """One prompt: its images and the questions asked about them."""

    images: list[Image.Image]
    questions: list[str]
    source: str = ""
    videos: list[Any] = field(default_factory=list)


@dataclass
class VQAAnswer:
    """Answers and compression facts of one request."""

    answers: list[str]
    prompt_tokens: int
    #: Image and video placeholder tokens of the prompt (the visual tokens the model attends to).
    image_tokens: int
    kept_per_head: list[list[int]] = field(default_factory=list)
    cache_bytes_before: int = 0
    cache_bytes_after: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if len(self.answers) == 1:
            out["answer"] = self.answers[0]
        return out


def load_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    """A PIL image from a PIL image or a file path, with a clear error when it cannot be opened."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot open image {str(image)!r}: {error}") from error
    raise TypeError(f"images must be PIL images or file paths, got {type(image).__name__}")


def load_video(video: Any) -> Any:
    """A video as the processors take it: a list of PIL frames or a ``(frames, height, width, 3)`` array."""
    if isinstance(video, (list, tuple)) and video and all(isinstance(frame, Image.Image) for frame in video):
        return [frame.convert("RGB") for frame in video]
    if hasattr(video, "shape") and len(video.shape) == 4 and video.shape[-1] == 3:
        return video
    raise TypeError(
        "a video must be a list of PIL frames or a (frames, height, width, 3) array, got "
        f"{type(video).__name__}"
    )


def build_requests(
    images: Any, question: str | None, questions: list[str] | None, videos: Any = None
) -> list[VQARequest]:
    """Normalise the pipeline's inputs and reject bad ones with clear errors."""
    if question is not None and questions is not None:
        raise ValueError("pass either question=... or questions=[...], not both")
    if isinstance(questions, str):
        raise TypeError(f"questions must be a list of strings, got the string {questions!r} (one: question=)")
    asked = [question] if question is not None else list(questions or [])
    if not asked:
        raise ValueError("no question given: pass question='...' or questions=[...]")
    for text in asked:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"questions must be non-empty strings, got {text!r}")
    no_images = images is None or (isinstance(images, (list, tuple)) and not images)
    no_videos = videos is None or (isinstance(videos, (list, tuple)) and not videos)
    if no_images and no_videos:
        raise ValueError(
            "no image or video given: this pipeline answers questions about images (images=...) or videos "
            "(videos=...)"
        )
    image_list = [] if no_images else list(images) if isinstance(images, (list, tuple)) else [images]
    if no_videos:
        video_list = []
    elif isinstance(videos, (list, tuple)) and not all(isinstance(frame, Image.Image) for frame in videos):
        video_list = list(videos)  # several videos
    else:
        video_list = [videos]  # one video: a list of frames or an array
    return [
        VQARequest(
            images=[load_image(image) for image in image_list],
            questions=asked,
            videos=[load_video(video) for video in video_list],
        )
    ]


class KVPressVQAPipeline(Pipeline):
    """Visual question answering under a press, registered as ``pipeline("kv-press-vqa")``.

    ``pipe(images=img, question="...", press=ShiftKVPress(budget=64), max_new_tokens=64)``
    compresses the whole prompt (image + question) at prefill, exactly like ``model.generate``
    under the press. With ``questions=[q1, q2, ...]`` the image prompt up to the question is
    prefilled and compressed once; each question is then appended to a copy of the compressed
    cache and answered greedily (no re-prefill; a copy rather than a crop back, since the state of
    sliding-window and linear-attention layers cannot be cut back). ``images`` may be a PIL image,
    a path, or a list of them (one multi-image prompt). A list of such requests (dicts with
    ``images`` and ``question``/``questions``) is answered in groups of ``batch_size``: the
    one-question requests of a group in one left-padded batch, the others one by one, each as it
    would be answered alone.

    Returns a dict (a list of dicts for a list of requests) with ``answer`` (single question) or
    ``answers``, ``prompt_tokens``, ``image_tokens``, ``kept_per_head`` (per layer, per KV head),
    and ``cache_bytes_before`` / ``cache_bytes_after`` of the prompt cache.
    """

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = get_adapter(self.model)
        if getattr(self.model.config, "vision_config", None) is None:
            raise TypeError(
                "kv-press-vqa needs an image-text model (one with a vision tower), got "
                f"{type(self.model).__name__}"
            )
        if not isinstance(self.processor, ProcessorMixin) or not hasattr(self.processor, "image_processor"):
            raise TypeError("kv-press-vqa needs the model's multimodal processor: pass processor=...")
        self._check_processor_matches_model()

    def _config_token(self, *names: str) -> int | None:
        config = self.model.config
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    def media_token_ids(self) -> list[int]:
        """The ids the model's config gives its image and video placeholder tokens: the soft tokens the
        vision features replace (Gemma 3's image soft token, not its begin-of-image token)."""
        image = self._config_token("image_token_id", "image_token_index")
        video = self._config_token("video_token_id", "video_token_index")
        return [token for token in (image, video) if token is not None]

    def _check_processor_matches_model(self) -> None:
        """The processor must expand an image into the token the model's config names: one is encoded."""
        tokenizer = self.processor.tokenizer
        image_id = self._config_token("image_token_id", "image_token_index")
        probe = VQARequest(images=[Image.new("RGB", (64, 64), (127, 127, 127))], questions=["?"])
        try:
            ids = self.encode([probe], [self.prompt_text(probe, "?")])["input_ids"]
            expanded, reason = bool((ids == image_id).any()), f"its image prompt holds no token {image_id}"
        except (ValueError, TypeError, KeyError) as error:
            expanded, reason = False, f"it cannot encode an image prompt ({type(error).__name__}: {error})"
        if image_id is None or not expanded:
            raise ValueError(
                f"the processor ({type(self.processor).__name__}) does not match the model "
                f"({type(self.model).__name__}, image token id {image_id}): {reason}. "
                "Pass the processor saved with this checkpoint"
            )
        text_vocab = self.model.get_input_embeddings().num_embeddings
        if len(tokenizer) > text_vocab:
            raise ValueError(
                f"the processor's tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                f"{text_vocab}: pass the processor saved with this checkpoint"
            )

    def _sanitize_parameters(
        self, press=None, max_new_tokens=None, question=None, questions=None, images=None
    ):
        forward = {}
        if press is not None:
            forward["press"] = press
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        return {}, forward, {}

    def __call__(
        self,
        requests: Any = None,
        *,
        images: Any = None,
        question: str | None = None,
        questions: list[str] | None = None,
        videos: Any = None,
        press: BudgetedPress | None = None,
        max_new_tokens: int = 64,
        batch_size: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        press = press if press is not None else FullKVPress()
        if not isinstance(press, BudgetedPress):
            raise TypeError(f"press must be an mmshiftkv press, got {type(press).__name__}")
        check_int(max_new_tokens, "max_new_tokens", minimum=1)
        size = batch_size if batch_size is not None else self._batch_size
        size = 1 if size is None else size
        check_int(size, "batch_size", minimum=1)
        if requests is None:
            parsed = build_requests(images, question, questions, videos)
            return self._answer(parsed, press, max_new_tokens)[0].as_dict()
        if any(arg is not None for arg in (images, question, questions, videos)):
            raise ValueError("pass either a list of requests or images=/videos=/question=, not both")
        parsed = []
        for request in requests if isinstance(requests, (list, tuple)) else [requests]:
            if not isinstance(request, dict):
                raise TypeError(f"each request must be a dict with images and question(s), got {request!r}")
            fields = ("images", "question", "questions", "videos")
            parsed += build_requests(*(request.get(name) for name in fields))
        answers: list[VQAAnswer] = []
        for start in range(0, len(parsed), size):
            answers += self._answer(parsed[start : start + size], press, max_new_tokens)
        return [answer.as_dict() for answer in answers]

    def preprocess(self, request: VQARequest) -> dict:
        return {"request": request}

    def _forward(self, model_inputs: dict, press: BudgetedPress | None = None, max_new_tokens: int = 64):
        return self._answer([model_inputs["request"]], press or FullKVPress(), max_new_tokens)[0]

    def postprocess(self, answer: VQAAnswer) -> dict[str, Any]:
        return answer.as_dict()

    def prompt_text(self, request: VQARequest, question: str) -> str:
        content = [{"type": "image"} for _ in request.images] + [{"type": "video"} for _ in request.videos]
        content.append({"type": "text", "text": question})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )

    def encode(self, requests: list[VQARequest], texts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        media: dict[str, Any] = {}
        if any(request.images for request in requests):
            media["images"] = [request.images for request in requests]  # one list per prompt
        if any(request.videos for request in requests):
            media["videos"] = [video for request in requests for video in request.videos]
        inputs = self.processor(**media, text=texts, return_tensors="pt", padding=True)
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def _answer(
        self, requests: list[VQARequest], press: BudgetedPress, max_new_tokens: int
    ) -> list[VQAAnswer]:
        """Answers in the order of ``requests``: one-question requests batched, the others one by one."""
        answers: dict[int, VQAAnswer] = {}
        single = [i for i, request in enumerate(requests) if len(request.questions) == 1]
        if single:
            batch = [requests[i] for i in single]
            texts = [self.prompt_text(request, request.questions[0]) for request in batch]
            inputs = self.encode(batch, texts)
            rows = generate_answers(self.model, self.processor, inputs, press, max_new_tokens)
            for b, (i, row) in enumerate(zip(single, rows)):
                answers[i] = self._facts(press, inputs, b, [row["generated"].strip()])
        for i, request in enumerate(requests):
            if i not in answers:
                answers[i] = self._answer_several(request, press, max_new_tokens)
        return [answers[i] for i in range(len(requests))]

    def _answer_several(self, request: VQARequest, press: BudgetedPress, max_new_tokens: int) -> VQAAnswer:
        template = self.prompt_text(request, QUESTION_MARK)
        context_text, suffix_template = template.split(QUESTION_MARK)
        context = self.encode([request], [context_text])
        tokenizer = self.processor.tokenizer
        answers = []
        with press(self.model), torch.no_grad():
            output = self.model(**context, **prompt_cache_argument(self.model), use_cache=True)
            prompt_cache = returned_cache(output)
            if prompt_cache is None:
                raise UnsupportedCacheError(
                    f"{type(self.model).__name__} returned no transformers Cache (a model-specific cache "
                    "class of this transformers release), which several questions on one prefill need: "
                    "ask one question per request"
                )
            facts = self._facts(press, context, 0, [])
            for question in request.questions:
                suffix = tokenizer(question + suffix_template, add_special_tokens=False, return_tensors="pt")
                input_ids = torch.cat(
                    [context["input_ids"], suffix["input_ids"].to(self.model.device)], dim=-1
                )
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    **cache_argument(self.model, copy.deepcopy(prompt_cache)),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                )
                answers.append(
                    tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
                )
        facts.answers = answers
        return facts

    def _facts(self, press: BudgetedPress, inputs: dict, sample: int, answers: list[str]) -> VQAAnswer:
        stats = press.stats
        config = self.adapter.text_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        token_bytes = 2 * head_dim * self.model.dtype.itemsize
        if stats.prompt_tokens:
            prompt_tokens, kept = stats.prompt_tokens[sample], stats.kept[:, sample, :]
        else:  # a press keeping everything on a cache of the model's own class records nothing
            prompt_tokens = int(inputs["attention_mask"][sample].sum())
            kept = torch.full((self.adapter.n_layers, self.adapter.n_kv_heads), prompt_tokens)
        media_tokens = self.media_token_ids()
        ids = inputs["input_ids"][sample]
        return VQAAnswer(
            answers=answers,
            prompt_tokens=prompt_tokens,
            image_tokens=sum(int((ids == token).sum()) for token in media_tokens),
            kept_per_head=kept.tolist(),
            cache_bytes_before=prompt_tokens * self.adapter.n_layers * self.adapter.n_kv_heads * token_bytes,
            cache_bytes_after=int(kept.sum()) * token_bytes,
        )


def register() -> None:
    """Register ``"kv-press-vqa"`` in transformers' pipeline registry (idempotent)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=KVPressVQAPipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
        )
