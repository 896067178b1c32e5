"""One ``with press(model):`` block: the hooks that find each prefill and let the press compress it.

:meth:`BudgetedPress.__call__ <mmshiftkv.presses.base.BudgetedPress.__call__>` builds a
:class:`PressSession`, which owns everything that exists only while the block runs: the model's
adapter, the state of the forward in flight, the hooks on the decoder, its rotary embedding and its
KV-holding attention layers, the guard around ``model.generate``, and the entry of the model in the
registry of active presses (one press per model, one model per press).

What the hooks rely on is behaviour, not keyword names: the KV cache is the :class:`Cache` among a
forward's arguments, the prefill is the decoder forward that starts on an empty cache, positions
are what the rotary embedding receives, padding is read off whatever mask the decoder gets (a 2-D
padding mask, a 4-D mask or a dict of them, :mod:`mmshiftkv.cache.masks`).

Refusals happen before the decoder's first layer runs wherever the reason is known by then (a
cache that cannot be compressed, right padding, a chunked or assisted prefill inside ``generate``),
so that a refused forward leaves a given cache as it was.

A session belongs to the thread that opened it: while it is open, running the model from another
thread raises :class:`PressUsageError` before anything runs (the hooks and the generate guard are
the model's, so that thread's forwards would otherwise be compressed, or mix their state with the
owner's).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from mmshiftkv.cache import CompressedLayer, compressed_attention, find_cache
from mmshiftkv.cache.masks import block_edges, full_mask, last_rows, padding_mask
from mmshiftkv.models.adapter import get_adapter
from mmshiftkv.presses.chunked import ChunkedPrefill
from mmshiftkv.presses.errors import CompressionSkippedWarning, PressUsageError, UnsupportedCacheError
from mmshiftkv.presses.state import ScoringState
from mmshiftkv.validation import check_int

if TYPE_CHECKING:
    from mmshiftkv.presses.base import BudgetedPress


#: Cache layers a press can replace by a :class:`~mmshiftkv.cache.CompressedLayer`: plain growing
#: layers (sliding-window layers are subclasses and are handled separately). Static layers keep a
#: fixed-size buffer the model's masks are built for, quantized layers hold most tokens in packed
#: form: swapping either silently changes the model's output, so they are refused.
def _compressible(layer: object) -> bool:
    kind = type(layer)
    if isinstance(layer, CompressedLayer):
        return True
    return isinstance(layer, DynamicLayer) and kind.__name__ in {
        "DynamicLayer",
        "DynamicSlidingWindowLayer",
    }


def check_compressible(cache: object, press_name: str) -> None:
    """Raise :class:`UnsupportedCacheError` unless every KV layer of ``cache`` can be compressed."""
    if not isinstance(cache, Cache):
        raise UnsupportedCacheError(f"{press_name} compresses a transformers Cache, not {type(cache)}")
    kv_layers = [layer for layer in cache.layers if isinstance(layer, DynamicLayer | CompressedLayer)]
    others = [layer for layer in cache.layers if not isinstance(layer, DynamicLayer | CompressedLayer)]
    unsupported = sorted({type(layer).__name__ for layer in kv_layers if not _compressible(layer)})
    # Linear-attention state layers of hybrid models hold no KV and are left alone; anything else
    # that is not a dynamic KV layer (static, quantized, offloaded) is refused.
    unsupported += sorted(
        {
            type(layer).__name__
            for layer in others
            if not type(layer).__name__.startswith(("LinearAttention", "Dummy"))
        }
    )
    offloaded = bool(getattr(cache, "offloading", False))
    if unsupported or offloaded:
        what = ", ".join(unsupported) + " layers" if unsupported else "offloaded layers"
        raise UnsupportedCacheError(
            f"{press_name} compresses DynamicCache layers, not {type(cache).__name__} with {what}: leave "
            "cache_implementation unset or pass a DynamicCache() (static, offloaded and quantized caches are "
            "not supported)"
        )


def check_left_padding(key_mask: torch.Tensor, press_name: str) -> None:
    """Refuse right-padded prompts: their last token is padding and would be kept as the prompt's last."""
    if not bool(key_mask[:, -1].all()):
        raise PressUsageError(
            f"{press_name}: a sample of the batch ends in padding (right padding). "
            "Presses need left padding: "
            "set tokenizer.padding_side = 'left' (or processor.tokenizer.padding_side = 'left')"
        )
    if not bool(key_mask.any(-1).all()):
        raise PressUsageError(f"{press_name}: a sample of the batch has no real token")


def _forward_length(args: tuple, kwargs: dict, hidden_size: int) -> int | None:
    """Tokens in a decoder forward: its input embeddings' or input ids' length; None when neither is found."""
    values = [*args, *kwargs.values()]
    for value in values:
        embeds = isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == 3
        if embeds and value.shape[-1] == hidden_size:
            return int(value.shape[1])
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and ids.ndim == 2 and not ids.is_floating_point():
        return int(ids.shape[1])
    return None


def _attention_input(args: tuple, kwargs: dict, hidden_size: int) -> torch.Tensor:
    """The attention layer's input hidden states, found by shape rather than by keyword."""
    candidates: Iterable[Any] = [*args, kwargs.get("hidden_states"), *kwargs.values()]
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[-1] == hidden_size:
            return value
    raise PressUsageError(
        f"cannot find the attention input (a (batch, seq_len, {hidden_size}) tensor) "
        "among the attention layer's arguments"
    )


# The press active on each model, to refuse a second press on the same model.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, BudgetedPress] = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


@dataclass
class _Forward:
    """What the decoder pre-hook learns about one forward, before its layers run."""

    cache: Cache | None
    #: True: the forward starts on an empty cache; False: it continues one (or has none); None: no
    #: cache was given and the decoder may build one (settled by the first attention layer).
    prefill: bool | None
    state: ScoringState
    checked_length: bool = False
    #: True while a layer is being scored: rotary calls a scorer makes then (kvpress's
    #: ExpectedAttention and CAP call it with future positions) are not the prompt's positions.
    scoring: bool = False
    #: The prompt's token ids (the decoder's, else those the model was called with), for the image mask.
    input_ids: torch.Tensor | None = None
    #: Tokens per row the cache held before this forward (> 0 for a later chunk of a chunked prefill).
    past: int = 0
    #: The chunked prefill this forward brings a chunk of (None: a one-forward prefill, or no prefill).
    chunked: ChunkedPrefill | None = None
    #: :func:`~mmshiftkv.cache.masks.block_edges` of the forward's mask.
    edges: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _ExpectedPrompt:
    """The length the next prefill spans, announced by ``generate`` or by ``press.expect_prompt``."""

    length: int
    by_generate: bool


class PressSession:
    """``press`` applied to ``model`` for one ``with`` block (built by ``press(model)``).

    Creating it claims ``model`` for ``press`` in the registry of active presses; :meth:`applied`
    installs the hooks for the duration of its block and releases everything on exit.

    Raises
    ------
    UnsupportedModelError
        If the model's structure cannot be compressed (the message names the missing part).
    PressUsageError
        If ``press`` is already active (one press object compresses one model at a time), or
        another press is already active on ``model``.
    """

    def __init__(self, press: BudgetedPress, model: nn.Module) -> None:
        self.press = press
        self.name = type(press).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{self.name}(...) is applied to a model: `with press(model):`, got {type(model).__name__}"
            )
        self.adapter = get_adapter(model)
        self.model = model
        #: The thread that opened the session: the only one whose forwards it sees.
        self.thread = threading.current_thread()
        #: The forward in flight, set by the decoder pre-hook; None between forwards.
        self.forward: _Forward | None = None
        self.prefills_seen = 0
        #: The ``input_ids`` of the model forward in flight, until its decoder forward takes them.
        self._model_input_ids: torch.Tensor | None = None
        #: The next prefill's length: set inside ``model.generate`` and by ``press.expect_prompt``.
        self.expected: _ExpectedPrompt | None = None
        #: A prefill that came in chunks and is not complete yet.
        self.chunked: ChunkedPrefill | None = None
        with _ACTIVE_LOCK:
            active = press._session
            if active is not None:
                raise PressUsageError(
                    f"this {self.name} is already active on a {type(active.model).__name__} "
                    f"(opened in thread {active.thread.name!r}); "
                    "one press object compresses one model at a time "
                    "(create another press for a second model, and do not nest a press inside itself)"
                )
            other = _ACTIVE.get(model)
            if other is not None:
                raise PressUsageError(
                    f"{type(model).__name__} already runs under a {type(other).__name__}; "
                    "presses do not nest. Exit the first `with` before entering another press"
                )
            _ACTIVE[model] = press
            press._session = self

    @contextmanager
    def applied(self) -> Generator[None, None, None]:
        """Hooks, the ``generate`` guard and compressed attention on the model; all removed on exit."""
        press, model, adapter = self.press, self.model, self.adapter
        hooks: list = []
        try:
            if press.allocator is not None:
                press.allocator.bind(adapter.n_layers, adapter.n_heads, adapter.n_kv_heads)
            press.post_init_from_model(model)
            hooks.append(model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            decoder = adapter.decoder
            # First: when the model is its own decoder, the ids must be taken before the decoder's hook.
            hooks.append(model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            hooks.append(decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
            hooks.append(decoder.register_forward_hook(self._decoder_hook, with_kwargs=True))
            hooks.append(
                adapter.rotary_emb.register_forward_pre_hook(self._rotary_pre_hook, with_kwargs=True)
            )
            hooks += [
                m.register_forward_hook(self._attention_hook, with_kwargs=True)
                for m in adapter.attention_modules
            ]
            own_generate = vars(model).get("generate")
            if hasattr(model, "generate"):
                # An instance attribute, removed on exit: generate's prompt length tells a chunked or
                # assisted prefill (which a press cannot compress correctly) from a whole-prompt one.
                model.generate = self._guarded_generate(model.generate)
            try:
                with compressed_attention(model):
                    yield
            finally:
                if own_generate is not None:
                    model.generate = own_generate
                elif "generate" in vars(model):
                    del model.generate
        finally:
            for hook in hooks:
                hook.remove()
            self.forward = None
            with _ACTIVE_LOCK:
                _ACTIVE.pop(model, None)
                press._session = None

    def warn_if_nothing_compressed(self) -> None:
        """After the block: a press that saw no prefill, or an unfinished one, compressed nothing."""
        if self.chunked is not None and self.press.asks_compression:
            warnings.warn(
                f"{self.name}: the chunked prefill stopped after {self.chunked.length} of its "
                f"{self.chunked.prompt_length} tokens; that prompt was not compressed.",
                CompressionSkippedWarning,
                stacklevel=4,
            )
        elif self.press.asks_compression and self.prefills_seen == 0:
            warnings.warn(
                f"{self.name}: no prefill ran inside the press context, nothing was compressed.",
                CompressionSkippedWarning,
                stacklevel=4,
            )

    # ---------------------------------------------------------------- hooks
    def _refuse_other_threads(self) -> None:
        if threading.current_thread() is not self.thread:
            raise PressUsageError(
                f"{type(self.model).__name__} runs under a {self.name} opened in thread "
                f"{self.thread.name!r}: while the press is open, the model runs only in that thread "
                f"(this is thread {threading.current_thread().name!r}). "
                "Run it there, or give this thread its own copy of the model"
            )

    def _in_owner_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep the token ids the model is called with: a VLM's decoder sees only embeddings."""
        self._refuse_other_threads()
        ids = kwargs.get("input_ids", args[0] if args else None)
        is_ids = isinstance(ids, torch.Tensor) and ids.ndim == 2 and not ids.is_floating_point()
        self._model_input_ids = ids if is_ids else None

    def _decoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._refuse_other_threads()
        cache = find_cache(args, kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        # No cache given: the decoder may build one itself (``model(..., use_cache=True)``); the first
        # attention layer tells (see ``_attention_hook``).
        prefill = None if cache is None else past == 0
        chunked = self._continued_prefill(cache, past)
        if chunked is not None:
            prefill = True
        mask = kwargs.get("attention_mask") if prefill is not False else None
        if cache is None and self.press.asks_compression:
            misplaced = [
                name
                for name, value in kwargs.items()
                if ("cache" in name or "past_key" in name)
                and value is not None
                and not isinstance(value, bool | torch.Tensor)
            ]
            if misplaced:
                raise UnsupportedCacheError(
                    f"{self.name} compresses a transformers Cache, "
                    f"not the {type(kwargs[misplaced[0]])} given as {misplaced[0]}= "
                    "(legacy tuple caches are not supported: pass DynamicCache())"
                )
        ids = kwargs.get("input_ids")
        ids = ids if isinstance(ids, torch.Tensor) else self._model_input_ids
        self._model_input_ids = None
        self.forward = _Forward(
            cache=cache,
            prefill=prefill,
            state=ScoringState(
                adapter=self.adapter,
                key_mask=padding_mask(mask, past),
                visibility=last_rows(mask, past=past),
                mask=full_mask(mask),
            ),
            input_ids=ids if prefill is not False else None,
            past=past,
            chunked=chunked,
            edges=block_edges(mask) if prefill is not False and self.expected is not None else None,
        )
        if prefill and chunked is None:
            # Refused before the decoder runs, so that a refusal leaves the cache as it was.
            length = _forward_length(args, kwargs, self.adapter.text_config.hidden_size)
            if length is not None:
                self._check_first_forward(length)
            if self.press.asks_compression:
                # A first chunk's padding says nothing of the prompt's end (checked at its last chunk).
                whole = self.expected is None or length is None or length >= self.expected.length
                self._check_prefill(cache, kwargs, padding=whole)

    def _continued_prefill(self, cache: Cache | None, past: int) -> ChunkedPrefill | None:
        """The chunked prefill a forward continues; refuse any other forward while one is under way."""
        chunked = self.chunked
        if chunked is None:
            return None
        if cache is not None and cache is chunked.cache and past == chunked.length:
            return chunked
        self.chunked = None
        seen = "brought no cache" if cache is None else f"continues a cache of {past} tokens"
        raise PressUsageError(
            f"{self.name}: a chunked prefill stopped after {chunked.length} of its {chunked.prompt_length} "
            f"tokens: the next forward {seen}. "
            "Forward the prompt's remaining chunks, in order, on the cache that holds its first ones"
        )

    def _check_prefill(self, cache: Cache, kwargs: dict, padding: bool = True) -> None:
        check_compressible(cache, self.name)
        key_mask = self.forward.state.key_mask if self.forward is not None else None
        if padding and key_mask is not None:
            check_left_padding(key_mask, self.name)
        config = self.adapter.text_config
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            raise PressUsageError(
                f"{self.name}: output_attentions=True under a compressing press would return "
                "attentions without the evicted tokens (or none at all where mmshiftkv's attention reads a "
                "compressed layer); run the analysis without a press"
            )

    def _cache_built_inside(self, forward: _Forward, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Settle a forward that got no cache: did the decoder build one, holding just this forward?"""
        cache = find_cache(args, kwargs)
        hidden_states = _attention_input(args, kwargs, self.adapter.text_config.hidden_size)
        layer = cache.layers[module.layer_idx] if cache is not None else None
        forward.prefill = layer is not None and layer.get_seq_length() == hidden_states.shape[1]
        if forward.prefill:
            forward.cache = cache
            if self.press.asks_compression:
                self._check_prefill(cache, kwargs)
        elif cache is None and self.press.asks_compression:
            warnings.warn(
                f"{self.name}: a forward ran without a KV cache (use_cache=False?); "
                "nothing to compress in it",
                CompressionSkippedWarning,
                stacklevel=3,
            )

    def _decoder_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Finish a prefill; refuse a cache the decoder built or used that is not a transformers ``Cache``."""
        if not self._in_owner_thread():
            return
        forward = self.forward
        if forward is not None and forward.prefill:
            self._finish_prefill(forward)
        if forward is None or forward.cache is not None or not self.press.asks_compression:
            return
        values = output.values() if hasattr(output, "values") else ()
        plain = torch.Tensor | tuple | list | dict | Cache
        foreign = [v for v in values if v is not None and not isinstance(v, plain)]
        if foreign:
            raise UnsupportedCacheError(
                f"{self.name} compresses a transformers Cache; {type(module).__name__} used a "
                f"{type(foreign[0]).__name__} (a model-specific cache class of this transformers release), "
                "so nothing could be compressed. "
                "Use a transformers release where this model uses DynamicCache"
            )

    def _finish_prefill(self, forward: _Forward) -> None:
        """End of a prefill forward: the press compresses the layers it deferred (whole-model
        allocators, :mod:`mmshiftkv.presses.deferred`); the model's full mask is released."""
        chunked = forward.chunked
        # The last chunk's forward finishes the chunked prompt: its layers were deferred with its state.
        state = chunked.prompt_state() if chunked is not None and chunked.complete else forward.state
        try:
            with self.press.scoring(state):
                self.press.finish_prefill(forward.cache)
        finally:
            forward.state.mask = None
            forward.input_ids = None

    def _rotary_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        forward = self.forward
        if not self._in_owner_thread() or forward is None or forward.prefill is False or forward.scoring:
            return
        forward.state.positions = self.adapter.rotary_call_positions(args, kwargs)

    def _attention_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        forward = self.forward
        if not self._in_owner_thread():
            return output
        if forward is not None and forward.prefill is None:
            self._cache_built_inside(forward, module, args, kwargs)
        if forward is None or not forward.prefill:
            return output
        hidden_states = _attention_input(args, kwargs, self.adapter.text_config.hidden_size)
        if forward.state.positions is None:
            raise PressUsageError(
                f"{self.name}: the decoder's rotary embedding was not called before layer "
                f"{module.layer_idx}; cannot know the prompt positions"
            )
        if not forward.checked_length:
            self._start_chunk(forward, hidden_states.shape[1])
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if forward.chunked is not None:
            self._add_chunk_layer(forward, module, hidden_states, kwargs)
            return output
        press = self.press
        if module is self.adapter.attention_modules[0]:
            self.prefills_seen += 1
            forward.state.image_mask = self.adapter.media_mask(forward.input_ids, *hidden_states.shape[:2])
        with press.scoring(forward.state), self._scoring_layer(forward):
            press.compress_layer(module, hidden_states, forward.cache, attentions, kwargs)
        return output

    @staticmethod
    @contextmanager
    def _scoring_layer(forward: _Forward) -> Generator[None, None, None]:
        """Mark ``forward`` as scoring a layer, so that the rotary pre-hook keeps the prompt's positions."""
        forward.scoring = True
        try:
            yield
        finally:
            forward.scoring = False

    # ------------------------------------------------------- chunked prefill
    def expect_prompt(self, prompt_length: int) -> None:
        """:meth:`BudgetedPress.expect_prompt <mmshiftkv.presses.base.BudgetedPress.expect_prompt>`."""
        check_int(prompt_length, "prompt_length", minimum=1)
        if self.chunked is not None:
            raise PressUsageError(
                f"{self.name}: a chunked prefill is under way ({self.chunked.length} of "
                f"{self.chunked.prompt_length} tokens); announce the next prompt once it is complete"
            )
        self.expected = _ExpectedPrompt(prompt_length, by_generate=False)

    def _check_first_forward(self, length: int) -> None:
        """The first forward of an announced prompt: whole, or a first chunk the press can score."""
        expected = self.expected
        if expected is None:
            return  # a forward on an empty cache is the whole prompt
        if length > expected.length:
            self.chunked = None
            if expected.by_generate:
                raise PressUsageError(
                    f"{self.name}: generate's first forward holds {length} tokens "
                    f"for a {expected.length}-token prompt: "
                    "assisted / speculative decoding (assistant_model=, prompt_lookup_num_tokens=) "
                    "verifies candidate tokens in the prefill, which a press would compress as prompt. "
                    "Not supported: generate without an assistant under a press"
                )
            raise self._overrun(length, expected.length)
        reason = self.press.chunked_prefill_reason()
        if length < expected.length and reason is not None and self.press.asks_compression:
            raise PressUsageError(
                f"{self.name} cannot score a prompt prefilled in chunks (the first forward holds "
                f"{length} of its {expected.length} tokens): {reason}. "
                "Prefill the prompt in one forward (without prefill_chunk_size=)"
            )

    def _overrun(self, total: int, announced: int) -> PressUsageError:
        return PressUsageError(
            f"{self.name}: a prefill forward brings the prompt to {total} tokens per row, "
            f"past the {announced} announced by expect_prompt(); "
            "announce the whole prompt's length (padding included)"
        )

    def _start_chunk(self, forward: _Forward, length: int) -> None:
        """At a prefill forward's first layer: is it the whole prompt, its first chunk or a later one?"""
        forward.checked_length = True
        expected = self.expected
        if expected is None:
            return  # a forward on an empty cache is the whole prompt
        if forward.chunked is None:
            self._check_first_forward(length)
            if length == expected.length:
                self._prompt_done()
                return
            forward.chunked = self.chunked = ChunkedPrefill(self.press, self.adapter, expected.length)
            forward.chunked.cache = forward.cache
        elif forward.chunked.length + length > expected.length:
            self.chunked = None
            raise self._overrun(forward.chunked.length + length, expected.length)
        state = forward.state
        batch = state.positions.shape[-2]
        try:
            forward.chunked.add_chunk(
                length,
                state.positions,
                state.key_mask,
                state.visibility,
                forward.edges,
                mask=state.mask,
                media_mask=self.adapter.media_mask(forward.input_ids, batch, length),
            )
        except PressUsageError:
            self.chunked = None
            raise

    def _add_chunk_layer(
        self, forward: _Forward, module: nn.Module, hidden_states: torch.Tensor, kwargs: dict
    ) -> None:
        """Fold a prefill chunk of one layer in; at the prompt's last chunk, compress the layer."""
        chunked, press = forward.chunked, self.press
        first = module is self.adapter.attention_modules[0]
        if first and forward.past == 0:
            self.prefills_seen += 1
        layer = forward.cache.layers[module.layer_idx]
        chunked.add_layer(module, hidden_states, getattr(layer, "keys", None))
        if not chunked.complete:
            return
        if first:
            try:
                state = chunked.prompt_state()
                if press.asks_compression and state.key_mask is not None:
                    check_left_padding(state.key_mask, self.name)
            except PressUsageError:
                self.chunked = None
                raise
        state = chunked.prompt_state()
        with press.scoring(state), self._scoring_layer(forward):
            # No attention weights: the last forward's cover only its own chunk's queries.
            press.compress_layer(module, chunked.attention_input(module), forward.cache, None, kwargs)
        if module is self.adapter.attention_modules[-1]:
            self.chunked = None
            self._prompt_done()

    def _prompt_done(self) -> None:
        """An announced prompt is in: ``expect_prompt`` holds for one prompt, ``generate``'s for its call."""
        if self.expected is not None and not self.expected.by_generate:
            self.expected = None

    def _guarded_generate(self, generate: Callable) -> Callable:
        def generate_under_press(*args, **kwargs):
            self._refuse_other_threads()
            prompt = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if prompt is None:
                prompt = kwargs.get("inputs_embeds")
            length = None if prompt is None else int(prompt.shape[1])
            self.expected = None if length is None else _ExpectedPrompt(length, by_generate=True)
            try:
                return generate(*args, **kwargs)
            finally:
                self.expected = None
                self.chunked = None

        return generate_under_press
