"""A small trained Qwen2.5-VL and a synthetic grounding task: press quality measurable on a CPU.

Random-weight models show that presses run and shrink the cache, not whether they keep the tokens
an answer needs. The shipped model (``checkpoint/``, about 0.5M parameters, trained from scratch
by :mod:`mmshiftkv.grounding.train`) answers questions about symbols in coloured boxes, and each
answer lives in known image tokens:

>>> from mmshiftkv.grounding import evaluate, load_grounding_model, make_dataset
>>> from mmshiftkv import SnapKVPress
>>> model, processor = load_grounding_model()
>>> evaluate(model, processor, make_dataset(200), press=SnapKVPress(budget=8)).accuracy
"""

from mmshiftkv.grounding.data import (
    COLOURS,
    EVAL_SEED,
    KINDS,
    SYMBOLS,
    GridSpec,
    GroundingSample,
    Item,
    make_dataset,
    make_sample,
    render,
)
from mmshiftkv.grounding.evaluate import (
    GroundingResult,
    answer_samples,
    evaluate,
    head_score_samples,
    prompt_batch,
)
from mmshiftkv.grounding.model import (
    ANSWER_PREFIX,
    CHECKPOINT_DIR,
    build_model,
    build_processor,
    load_grounding_model,
    prompt_text,
)

__all__ = [
    "ANSWER_PREFIX",
    "CHECKPOINT_DIR",
    "COLOURS",
    "EVAL_SEED",
    "KINDS",
    "SYMBOLS",
    "GridSpec",
    "GroundingResult",
    "GroundingSample",
    "Item",
    "answer_samples",
    "build_model",
    "build_processor",
    "evaluate",
    "head_score_samples",
    "load_grounding_model",
    "make_dataset",
    "make_sample",
    "prompt_batch",
    "prompt_text",
    "render",
]
