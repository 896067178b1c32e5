"""What a press needs to know about a model family, in one place.

A :class:`ModelAdapter` answers, for any supported Hugging Face model: where the decoder layers
are, how to get pre-RoPE queries from an attention layer's input, how to apply the model's rotary
embedding (1-D RoPE or Qwen2-VL's 3-D M-RoPE) at arbitrary positions, and which positions future
decode queries will have. Presses never look at model classes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import (
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
    Qwen2VLForConditionalGeneration,
    Qwen3ForCausalLM,
)

from mmshiftkv.cache.context import decoder_of

RopeKind = Literal["rope", "mrope"]

#: Supported model classes, their family name and rotary-embedding kind.
SUPPORTED_FAMILIES: dict[type[PreTrainedModel], tuple[str, RopeKind]] = {
    Qwen2_5_VLForConditionalGeneration: ("qwen2.5-vl", "mrope"),
    Qwen2VLForConditionalGeneration: ("qwen2-vl", "mrope"),
    LlavaNextForConditionalGeneration: ("llava-next", "rope"),
    LlavaForConditionalGeneration: ("llava", "rope"),
    LlamaForCausalLM: ("llama", "rope"),
    Qwen2ForCausalLM: ("qwen2", "rope"),
    Qwen3ForCausalLM: ("qwen3", "rope"),
    MistralForCausalLM: ("mistral", "rope"),
}


class UnsupportedModelError(TypeError):
    """Raised when a press is applied to a model family the library has no adapter for."""


def supported_family_names() -> list[str]:
    """Names of the supported model families, in the order of :data:`SUPPORTED_FAMILIES`."""
    return [name for name, _ in SUPPORTED_FAMILIES.values()]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE partner of each feature: ``(-x2, x1)`` for ``x = (x1, x2)`` split in halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class ModelAdapter:
    """Model-family knowledge used by every press.

    Parameters
    ----------
    model : PreTrainedModel
        A supported model (see :data:`SUPPORTED_FAMILIES`).
    family : str
        Family name, e.g. ``"qwen2.5-vl"``.
    rope_kind : {"rope", "mrope"}
        ``"mrope"`` for Qwen2-VL / Qwen2.5-VL, whose positions have shape ``(3, batch, seq_len)``
        and whose cos/sin are applied per ``mrope_section``.
    """

    model: PreTrainedModel
    family: str
    rope_kind: RopeKind

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (``model.model.language_model`` for VLMs, ``model.model`` otherwise)."""
        return decoder_of(self.model)

    @property
    def text_config(self):
        """The decoder's configuration."""
        return self.language_model.config

    @property
    def attention_modules(self) -> list[nn.Module]:
        """The ``self_attn`` module of every decoder layer, in layer order."""
        return [layer.self_attn for layer in self.language_model.layers]

    @property
    def n_layers(self) -> int:
        return len(self.language_model.layers)

    @property
    def n_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def mrope_section(self) -> list[int]:
        """Feature split of M-RoPE over (temporal, height, width); only for ``rope_kind == "mrope"``."""
        params = getattr(self.text_config, "rope_parameters", None) or {}
        section = params.get("mrope_section") or (getattr(self.text_config, "rope_scaling", None) or {}).get(
            "mrope_section"
        )
        if section is None:
            raise ValueError(f"{self.family}: the text config has no mrope_section")
        return list(section)

    def query_states(self, attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries of an attention layer.

        Parameters
        ----------
        attention : nn.Module
            One of :attr:`attention_modules`.
        hidden_states : torch.Tensor
            The attention input (after the layer's input norm), shape ``(batch, n, hidden)``.

        Returns
        -------
        torch.Tensor
            ``(batch, heads, n, head_dim)``, including the q-norm of models that have one.
        """
        batch, n, _ = hidden_states.shape
        queries = attention.q_proj(hidden_states).view(batch, n, -1, attention.head_dim)
        if hasattr(attention, "q_norm"):
            queries = attention.q_norm(queries)
        return queries.transpose(1, 2)

    def rotary_cos_sin(
        self, like: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the model's rotary embedding at ``positions``, merged to ``(batch, n, head_dim)``.

        Parameters
        ----------
        like : torch.Tensor
            Any tensor with the dtype/device the result should have.
        positions : torch.Tensor
            ``(batch, n)`` for RoPE models, ``(3, batch, n)`` for M-RoPE models.
        """
        # forward() rather than __call__: the press's own position-capturing hook must not fire.
        cos, sin = self.language_model.rotary_emb.forward(like, positions)
        if self.rope_kind == "mrope":
            # Each feature block takes the position of its own axis (temporal, height, width).
            section = self.mrope_section * 2
            cos = torch.cat([part[i % 3] for i, part in enumerate(cos.split(section, dim=-1))], dim=-1)
            sin = torch.cat([part[i % 3] for i, part in enumerate(sin.split(section, dim=-1))], dim=-1)
        return cos, sin

    def apply_rope(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``states`` of shape ``(batch, heads, n, head_dim)`` to ``positions``.

        ``positions`` is ``(batch, n)`` for RoPE models and ``(3, batch, n)`` for M-RoPE models.
        """
        cos, sin = self.rotary_cos_sin(states, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return states * cos + rotate_half(states) * sin

    def normalize_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """Bring the positions fed to the rotary embedding to ``(batch, n)`` or ``(3, batch, n)``."""
        if self.rope_kind == "mrope":
            if position_ids.dim() == 2:
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
            return position_ids.expand(3, batch, -1)
        return position_ids.expand(batch, -1)

    def next_positions(self, prompt_positions: torch.Tensor) -> torch.Tensor:
        """Position of the first generated token, per sample, shape ``(batch,)``.

        It is ``max(prompt positions) + 1`` over every M-RoPE axis: after an image, Qwen2-VL's text
        positions are compressed (``rope_deltas``) and the next position is not ``seq_len``. For
        RoPE models with left padding it is the number of real tokens.
        """
        if self.rope_kind == "mrope":
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
            ``(batch, n)`` for RoPE models; ``(3, batch, n)`` for M-RoPE models, the same value in all
            three axes, as Qwen2-VL gives generated text tokens.
        """
        positions = (
            self.next_positions(prompt_positions)[:, None] + offsets.to(prompt_positions.device)[None, :]
        )
        if self.rope_kind == "mrope":
            return positions.unsqueeze(0).expand(3, -1, -1)
        return positions


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or :class:`UnsupportedModelError` naming the supported families."""
    for cls, (family, rope_kind) in SUPPORTED_FAMILIES.items():
        if isinstance(model, cls):
            return ModelAdapter(model=model, family=family, rope_kind=rope_kind)
    raise UnsupportedModelError(
        f"mmshiftkv has no adapter for {type(model).__name__}. Supported model families: "
        + ", ".join(f"{name} ({cls.__name__})" for cls, (name, _) in SUPPORTED_FAMILIES.items())
        + ". Pass the full model (e.g. Qwen2_5_VLForConditionalGeneration), not a sub-module."
    )
