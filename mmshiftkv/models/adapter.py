"""What a press needs to know about a model, found from the model's structure rather than its class.

:func:`get_adapter` inspects any Hugging Face decoder or vision-language model and returns a
:class:`ModelAdapter` that answers: where the text decoder is (the module whose config is the
model's text config), which of its layers hold a KV cache (those with a ``self_attn`` that has
separate ``q_proj`` / ``k_proj`` / ``v_proj``; linear-attention layers are left alone), how to get
pre-RoPE queries from an attention input (q-norm and output gates included), how the model's own
rotary embedding rotates a vector at arbitrary positions (1-D RoPE, split or merged M-RoPE,
partial rotary, half or pairwise rotation, per-layer-type rotary) and which positions future
decode queries will have.

The rotation is *measured*, not assumed: at the first prefill, :meth:`ModelAdapter.verify_rotation`
rotates the layer's own pre-RoPE keys with each candidate rule and keeps the one that reproduces
the keys the model wrote to its cache; if none does, compression stops with an error instead of
scoring with the wrong geometry. Presses never look at model classes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from mmshiftkv.ops.projection import affine_rotate_half_compiled, rotate_half_compiled

#: "half": features (i, i + d/2) rotate together, cos/sin laid out as cat(f, f) (Llama, Qwen);
#: "pairwise": features (2i, 2i+1) rotate together, cos/sin laid out as cat(f, f) (GLM-4, transformers
#: < 5.20); "interleaved": pairwise, cos/sin already laid out as (f0, f0, f1, f1, ...) (GLM-4V, 5.24).
RotationStyle = Literal["half", "pairwise", "interleaved"]

#: Relative error under which a candidate rotation counts as reproducing the model's keys. Wrong
#: rules are off by O(1); fp32 re-computation agrees to ~1e-6, bf16 to ~1e-2.
ROTATION_TOLERANCE = 5e-2
#: Last prompt tokens whose keys :meth:`ModelAdapter.verify_rotation` reproduces (a chunked prefill keeps
#: at least these rows of every layer's attention input).
ROTATION_CHECK_ROWS = 8


class UnsupportedModelError(TypeError):
    """Raised when a press is applied to a model whose structure it cannot compress."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE partner of each feature: ``(-x2, x1)`` for ``x = (x1, x2)`` split in halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The RoPE partner of each feature for pairwise rotation: ``(-x1, x0, -x3, x2, ...)``."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: RotationStyle) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of ``states``; the rest pass unchanged.

    ``cos``/``sin`` broadcast against ``states[..., :rotary_dim]``; see :data:`RotationStyle` for
    the layouts. Pairwise rotation (GLM-4) pairs features ``(2i, 2i+1)`` and so uses each frequency
    twice in a row.
    """
    if style == "half":
        # float32 CPU states: the compiled op's one pass (ShiftKV rotates 512 proxies per query head).
        compiled = rotate_half_compiled(states, cos, sin)
        if compiled is not None:
            return compiled
    rotary_dim = cos.shape[-1]
    rotated, passed = states[..., :rotary_dim], states[..., rotary_dim:]
    if style == "pairwise":
        cos = cos[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
    if style in ("pairwise", "interleaved"):
        rotated = rotated * cos + rotate_pairs(rotated) * sin
    elif rotated.dtype == torch.float32:
        # One product and two in-place multiply-adds on the halves: no temporaries of the states'
        # size (ShiftKV rotates 512 proxies per query head in every layer). Half-precision states
        # keep the plain form, which ATen runs faster there than in-place updates of strided halves.
        half = rotary_dim // 2
        product = rotated * cos
        product[..., :half].addcmul_(rotated[..., half:], sin[..., :half], value=-1)
        product[..., half:].addcmul_(rotated[..., :half], sin[..., half:])
        rotated = product
    else:
        rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat([rotated, passed], dim=-1) if passed.shape[-1] else rotated


def _refuse(model: nn.Module, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"mmshiftkv cannot compress {type(model).__name__}: {reason}. Presses need a decoder whose "
        "self-attention layers project queries, keys and values separately and rotate them with a "
        "rotary embedding, and whose KV cache is written once per prompt token."
    )


def find_decoder(model: nn.Module) -> nn.Module:
    """The text decoder: the sub-module whose ``config`` is the model's text config and has ``layers``.

    VLMs keep it at ``model.model.language_model`` (Qwen-VL, LLaVA, InternVL, Gemma 3, ...) or
    ``model.model.text_model`` (Idefics3, SmolVLM); decoder-only LMs at ``model.model``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise _refuse(model, "it is not a transformers model (no config)")
    text_config = config.get_text_config(decoder=True)
    candidates = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "layers", None), nn.ModuleList)
        and getattr(module, "config", None) is text_config
    ]
    if not candidates:
        candidates = [
            module
            for module in model.modules()
            if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "rotary_emb")
        ]
    if not candidates:
        raise _refuse(model, "no text decoder (a module with the text config and a `layers` list) was found")
    return candidates[0]


#: Config fields naming the token ids of image and video features (:attr:`ModelAdapter.media_token_ids`).
MEDIA_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


@dataclass
class ModelAdapter:
    """Structural knowledge of one model used by every press.

    Build it with :func:`get_adapter`.

    Attributes
    ----------
    model : nn.Module
        The full model the press was entered on.
    decoder : nn.Module
        The text decoder (see :func:`find_decoder`).
    attention_modules : list of nn.Module
        The ``self_attn`` modules of the layers that hold a KV cache, in layer order.
    family : str
        The text config's ``model_type`` (for messages and tables).
    rotation_style : {"half", "pairwise", "interleaved"} or None
        How the model rotates features, set by :meth:`verify_rotation` (None until measured).
    """

    model: nn.Module
    decoder: nn.Module
    attention_modules: list[nn.Module]
    family: str
    rotation_style: RotationStyle | None = None
    _ordinal: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._ordinal = {module.layer_idx: i for i, module in enumerate(self.attention_modules)}

    # ------------------------------------------------------------------ shape
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (alias of :attr:`decoder`)."""
        return self.decoder

    @property
    def text_config(self):
        return self.decoder.config

    @property
    def n_layers(self) -> int:
        """Number of layers that hold a KV cache (all layers, except in hybrid linear-attention models)."""
        return len(self.attention_modules)

    @property
    def n_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    def ordinal(self, module: nn.Module) -> int:
        """Index of ``module`` among the KV-holding layers (what allocators call the layer index)."""
        return self._ordinal[module.layer_idx]

    @property
    def rotary_emb(self) -> nn.Module:
        return self.decoder.rotary_emb

    # ------------------------------------------------------------------ media
    @property
    def media_token_ids(self) -> tuple[int, ...]:
        """Token ids that stand for image or video features in ``input_ids`` (empty for a text model).

        Read from the model config's :data:`MEDIA_TOKEN_FIELDS` (``image_token_id`` in Qwen-VL, GLM-4V,
        InternVL, Idefics3; ``image_token_index`` in LLaVA, Mistral3, Gemma 3; the video ones likewise).
        """
        config = self.model.config
        found = {getattr(config, name, None) for name in MEDIA_TOKEN_FIELDS}
        return tuple(sorted(v for v in found if isinstance(v, int) and not isinstance(v, bool)))

    def media_mask(self, input_ids: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
        """``(batch, seq_len)`` bool, True at image/video tokens of the prompt ``input_ids``.

        All False for a text-only model (no media token ids in its config), whatever the inputs; None
        when the model has media tokens but the prompt's ids are unknown or of another shape
        (``inputs_embeds`` alone).
        """
        ids = self.media_token_ids
        if not ids:
            return torch.zeros(batch, seq_len, dtype=torch.bool)
        if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != (batch, seq_len):
            return None
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    # ------------------------------------------------------------- projections
    def query_states(self, attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries of an attention layer, ``(batch, heads, n, head_dim)``.

        Includes the q-norm of models that have one; for gated attention (Qwen3.5, whose
        ``q_proj`` emits query and gate per head) only the query half is returned.
        """
        return self.query_heads(attention, attention.q_proj(hidden_states))

    def query_projection(self, attention: nn.Module) -> nn.Linear | None:
        """The layer's ``q_proj`` where it is a plain ``nn.Linear`` (affine in its input), else None.

        Quantized or adapter-wrapped projections are not exactly affine; callers project through
        :meth:`query_states` then.
        """
        q_proj = attention.q_proj
        return q_proj if type(q_proj) is nn.Linear else None

    def query_heads(self, attention: nn.Module, projected: torch.Tensor) -> torch.Tensor:
        """:meth:`query_states` from the ``q_proj`` output ``(batch, n, q_proj.out_features)``."""
        batch, n, _ = projected.shape
        per_head = projected.shape[-1] // self.n_heads
        queries = projected.view(batch, n, self.n_heads, per_head)
        if per_head == 2 * attention.head_dim:
            queries = queries[..., : attention.head_dim]
        q_norm = getattr(attention, "q_norm", None)
        if q_norm is not None:
            queries = q_norm(queries)
        return queries.transpose(1, 2)

    def key_states(self, attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys of an attention layer, ``(batch, kv_heads, n, head_dim)`` (k-norm included)."""
        batch, n, _ = hidden_states.shape
        keys = attention.k_proj(hidden_states).view(batch, n, self.n_kv_heads, attention.head_dim)
        k_norm = getattr(attention, "k_norm", None)
        if k_norm is not None:
            keys = k_norm(keys)
        return keys.transpose(1, 2)

    # ---------------------------------------------------------------- rotary
    def rotary_cos_sin(
        self, like: torch.Tensor, positions: torch.Tensor, attention: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the model's rotary embedding at ``positions``, merged to ``(batch, n, rotary_dim)``.

        Parameters
        ----------
        like : torch.Tensor
            Any tensor with the dtype/device the result should have.
        positions : torch.Tensor
            ``(batch, n)``, or ``(3, batch, n)`` for M-RoPE models.
        attention : nn.Module, optional
            The layer asking, for models whose rotary embedding depends on the layer type (Gemma 3).
        """
        rotary = self.rotary_emb
        extra = []
        if _takes_layer_type(rotary):
            extra = [_layer_type(attention if attention is not None else self.attention_modules[0])]
        # forward() rather than __call__: the press's own position-capturing hook must not fire.
        cos, sin = rotary.forward(like, positions, *extra)
        return self.merge_rotary_axes(cos, sin)

    def merge_rotary_axes(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's cos/sin as ``(batch, n, rotary_dim)``, split M-RoPE merged."""
        if cos.ndim == 4:
            # Split M-RoPE (Qwen2-VL up to transformers 5.19): one cos/sin per axis; each feature
            # block takes the position of its own axis (temporal, height, width).
            section = self.mrope_section * 2
            cos = torch.cat([part[i % 3] for i, part in enumerate(cos.split(section, dim=-1))], dim=-1)
            sin = torch.cat([part[i % 3] for i, part in enumerate(sin.split(section, dim=-1))], dim=-1)
        return cos, sin

    @property
    def mrope_section(self) -> list[int]:
        """Feature split of M-RoPE over (temporal, height, width), for rotary embeddings that do not merge."""
        params = getattr(self.text_config, "rope_parameters", None) or {}
        section = params.get("mrope_section") or (getattr(self.text_config, "rope_scaling", None) or {}).get(
            "mrope_section"
        )
        if section is None:
            raise UnsupportedModelError(
                f"{self.family}: the rotary embedding returns one cos/sin per M-RoPE axis "
                "but the text config names no mrope_section"
            )
        return list(section)

    def apply_rope(
        self, states: torch.Tensor, positions: torch.Tensor, attention: nn.Module | None = None
    ) -> torch.Tensor:
        """Rotate ``states`` of shape ``(batch, heads, n, head_dim)`` to ``positions`` as the model does."""
        cos, sin = self.rotary_cos_sin(states, positions, attention)
        return rotate(states, cos.unsqueeze(1), sin.unsqueeze(1), self.rotation_style or "half")

    def rotated_affine_queries(
        self,
        attention: nn.Module,
        base: torch.Tensor,
        offset: torch.Tensor,
        scale: torch.Tensor,
        positions: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Rotated queries of the ``q_proj`` outputs ``offset + scale * base``, in ``dtype``.

        ``apply_rope(query_heads(offset + scale * base), positions)`` computed in float32 and rounded
        to ``dtype`` once; where the query heads are a plain split of ``q_proj``'s output (no q-norm,
        no gate) and the rotation is half-style, in one compiled pass that stores no float32 product
        (:func:`mmshiftkv.ops.projection.affine_rotate_half_compiled`).

        Parameters
        ----------
        attention : nn.Module
            The layer whose ``q_proj`` gave the outputs.
        base : torch.Tensor
            ``(n, q_proj.out_features)``.
        offset : torch.Tensor
            ``(batch, q_proj.out_features)`` float32.
        scale : torch.Tensor
            ``(batch,)`` float32.
        positions : torch.Tensor
            ``(batch, p)`` or ``(3, batch, p)`` with ``p`` dividing ``n``: row ``i`` is at position
            ``i % p`` of them.
        dtype : torch.dtype
            The result's dtype.

        Returns
        -------
        torch.Tensor
            ``(batch, heads, n, head_dim)``.
        """
        plain_heads = (
            base.shape[-1] == self.n_heads * attention.head_dim and getattr(attention, "q_norm", None) is None
        )
        if plain_heads and (self.rotation_style or "half") == "half":
            cos, sin = self.rotary_cos_sin(offset, positions, attention)
            fused = affine_rotate_half_compiled(base, offset, scale, cos, sin, self.n_heads, dtype)
            if fused is not None:
                return fused
        projected = torch.addcmul(offset[:, None], scale[:, None, None], base)
        tiled = positions.repeat(*([1] * (positions.dim() - 1)), base.shape[0] // positions.shape[-1])
        return self.apply_rope(self.query_heads(attention, projected), tiled, attention).to(dtype)

    def verify_rotation(
        self,
        attention: nn.Module,
        hidden_states: torch.Tensor,
        cached_keys: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Find the rotation rule that reproduces the keys the model cached; raise if none does.

        Parameters
        ----------
        attention : nn.Module
            A KV-holding attention layer.
        hidden_states : torch.Tensor
            Its prefill input, ``(batch, seq_len, hidden)``.
        cached_keys : torch.Tensor
            The rotated keys it wrote to the cache, ``(batch, kv_heads, cached, head_dim)``; the last
            ``cached`` prompt tokens (a sliding-window layer may hold fewer than ``seq_len``).
        positions : torch.Tensor
            The prefill positions given to the rotary embedding.
        """
        if self.rotation_style is not None:
            return
        n = min(cached_keys.shape[2], ROTATION_CHECK_ROWS)
        with torch.no_grad():
            raw = self.key_states(attention, hidden_states[:, -n:]).float()
            cos, sin = self.rotary_cos_sin(raw, positions[..., -n:], attention)
            target = cached_keys[:, :, -n:].float()
            errors = {}
            for style in ("half", "pairwise", "interleaved"):
                rotated = rotate(raw, cos.float().unsqueeze(1), sin.float().unsqueeze(1), style)
                errors[style] = float((rotated - target).norm() / target.norm().clamp(min=1e-12))
        style, error = min(errors.items(), key=lambda item: item[1])
        if error > ROTATION_TOLERANCE:
            raise UnsupportedModelError(
                f"{self.family}: mmshiftkv cannot reproduce the model's rotary embedding (relative error "
                f"{error:.3g} of its cached keys with the best rule {style!r}); scoring would use the wrong "
                "positions, so nothing is compressed"
            )
        self.rotation_style = style

    # -------------------------------------------------------------- positions
    def normalize_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """Bring the positions fed to the rotary embedding to ``(batch, n)`` or ``(3, batch, n)``."""
        if position_ids.dim() == 3:
            return position_ids.expand(-1, batch, -1)
        return position_ids.expand(batch, -1)

    def rotary_call_positions(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The positions a call of the rotary embedding received (its integer tensor), normalized."""
        values = [*args, *kwargs.values()]
        like = next(v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())
        positions = next(v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point())
        return self.normalize_positions(positions, like.shape[0])

    @staticmethod
    def next_positions(prompt_positions: torch.Tensor) -> torch.Tensor:
        """Position of the first generated token, per sample, shape ``(batch,)``.

        It is ``max(prompt positions) + 1`` over every M-RoPE axis: after an image or a video,
        Qwen-VL text positions are compressed (``rope_deltas``) and the next position is not
        ``seq_len``. For 1-D RoPE with left padding it is the number of real tokens.
        """
        if prompt_positions.dim() == 3:
            return prompt_positions.amax(dim=(0, 2)) + 1
        return prompt_positions.amax(dim=-1) + 1

    def future_positions(self, prompt_positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Positions ``next + offsets`` that future decode queries will have.

        Parameters
        ----------
        prompt_positions : torch.Tensor
            The prefill positions, ``(batch, seq_len)`` or ``(3, batch, seq_len)``.
        offsets : torch.Tensor
            ``(n,)`` non-negative offsets from the first generated position.

        Returns
        -------
        torch.Tensor
            ``(batch, n)``, or ``(3, batch, n)`` with the same value on all three axes, as M-RoPE
            models give generated text tokens.
        """
        positions = (
            self.next_positions(prompt_positions)[:, None] + offsets.to(prompt_positions.device)[None, :]
        )
        if prompt_positions.dim() == 3:
            return positions.unsqueeze(0).expand(prompt_positions.shape[0], -1, -1)
        return positions


def _takes_layer_type(rotary: nn.Module) -> bool:
    parameters = [
        p
        for p in inspect.signature(rotary.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(parameters) >= 3


def _layer_type(attention: nn.Module) -> str:
    layer_type = getattr(attention, "layer_type", None)
    if layer_type is None:
        layer_types = getattr(attention.config, "layer_types", None)
        if layer_types is None:
            raise UnsupportedModelError(
                f"{type(attention).__name__}: the rotary embedding needs a layer type, "
                "but neither the attention layer nor the config names one"
            )
        layer_type = layer_types[attention.layer_idx]
    return layer_type


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Inspect ``model`` and return its adapter.

    Raises
    ------
    UnsupportedModelError
        Naming the structural part that is missing or that this kind of compression cannot handle
        (encoder-decoder models, cross-attention layers, fused QKV projections, chunked or
        position-free attention layers, no rotary embedding).
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise _refuse(model, "it is an encoder-decoder model (its decoder also attends to encoder states)")
    decoder = find_decoder(model)
    text_config = decoder.config
    family = getattr(text_config, "model_type", type(model).__name__)
    layers = list(decoder.layers)
    if any(hasattr(layer, "cross_attn") or hasattr(layer, "cross_attention") for layer in layers):
        raise _refuse(
            model, "its decoder has cross-attention layers (their keys are image states, not prompt tokens)"
        )
    if getattr(text_config, "attention_chunk_size", None) or getattr(text_config, "no_rope_layers", None):
        raise _refuse(
            model,
            "its decoder mixes chunked-attention and position-free (NoPE) layers, which a prefill-time "
            "selection scored for full causal RoPE attention would misjudge",
        )
    # Linear-attention layers (hybrid models) have no self_attn and hold no KV.
    attentions = [layer.self_attn for layer in layers if getattr(layer, "self_attn", None) is not None]
    if not attentions:
        raise _refuse(model, "no decoder layer has a `self_attn` module")
    for attention in attentions:
        missing = [name for name in ("q_proj", "k_proj", "v_proj") if not hasattr(attention, name)]
        if missing:
            raise _refuse(
                model,
                f"its attention {type(attention).__name__} has no {', '.join(missing)} "
                "(fused QKV projections are not supported)",
            )
        if not hasattr(attention, "layer_idx") or not hasattr(attention, "head_dim"):
            raise _refuse(model, f"its attention {type(attention).__name__} has no layer_idx / head_dim")
    if not hasattr(decoder, "rotary_emb"):
        raise _refuse(model, "its decoder has no rotary embedding (`rotary_emb`)")
    return ModelAdapter(model=model, decoder=decoder, attention_modules=attentions, family=family)
