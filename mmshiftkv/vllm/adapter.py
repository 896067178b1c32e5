"""What the library's presses need from a model, answered from a vLLM model's own modules.

Presses call ``self.state.adapter`` for pre-RoPE queries, RoPE at arbitrary positions and the
positions future decode queries will have (see :class:`mmshiftkv.models.adapter.ModelAdapter`).
:class:`VLLMAdapter` offers the same methods on vLLM's attention modules (fused ``qkv_proj``, the
layer's own ``rotary_emb``), so each press's ``score()`` runs unchanged inside vLLM: one
implementation per press, two engines.

A press scores one request at a time here (batch 1, no padding): vLLM's batch is a flat list of
tokens from requests of different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmshiftkv.models.adapter import ModelAdapter, RotationStyle


@dataclass
class AttentionView:
    """One vLLM decoder attention module as a press sees it.

    Presses read ``layer_idx`` (ShiftKV seeds its proxies with it, so it must be the decoder
    layer's index, as in transformers) and ``scaling``; the adapter reaches the projections
    through ``module``.

    Attributes
    ----------
    module : nn.Module
        The vLLM attention module (``Qwen2Attention``, ``LlamaAttention``, ...): it has ``qkv_proj``,
        ``rotary_emb`` and an ``attn`` layer holding the KV cache.
    layer_idx : int
        Index of its decoder layer.
    scaling : float
        Softmax scale of its attention.
    """

    module: nn.Module
    layer_idx: int
    scaling: float

    @property
    def head_dim(self) -> int:
        return self.module.head_dim


@dataclass
class VLLMAdapter:
    """The subset of :class:`~mmshiftkv.models.adapter.ModelAdapter` that presses use, for vLLM models.

    Head counts are those of this tensor-parallel rank: each rank scores and compacts its own KV
    heads.

    Attributes
    ----------
    n_heads, n_kv_heads : int
        Query and KV heads per layer on this rank.
    n_layers : int
        Decoder layers holding a KV cache.
    rotation_style : {"half", "pairwise"}
        How the model's rotary embedding pairs features (vLLM's ``is_neox_style``: half).
    """

    n_heads: int
    n_kv_heads: int
    n_layers: int
    rotation_style: RotationStyle = "half"

    # The positions of future decode queries follow the prompt's positions the same way in both
    # engines (max + 1 over every M-RoPE axis): reuse the library's rule rather than restate it.
    next_positions = staticmethod(ModelAdapter.next_positions)
    future_positions = ModelAdapter.future_positions

    def query_states(self, attention: AttentionView, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries, ``(1, heads, n, head_dim)``, from an attention input ``(1, n, hidden)``."""
        module = attention.module
        batch, n, _ = hidden_states.shape
        if batch != 1:
            raise ValueError(f"VLLMAdapter scores one request at a time, got a batch of {batch}")
        qkv, _ = module.qkv_proj(hidden_states[0])
        queries = qkv[..., : module.q_size].reshape(n, module.num_heads, module.head_dim)
        q_norm = getattr(module, "q_norm", None)
        if q_norm is not None and getattr(module, "qk_norm", True):
            queries = q_norm(queries)
        return queries.transpose(0, 1)[None]

    def query_projection(self, attention: AttentionView) -> None:
        """None: vLLM's query projection is fused into ``qkv_proj`` and may be quantized, so presses
        project through :meth:`query_states`."""
        return None

    def apply_rope(
        self, states: torch.Tensor, positions: torch.Tensor, attention: AttentionView | None = None
    ) -> torch.Tensor:
        """Rotate ``states`` ``(1, heads, n, head_dim)`` to ``positions`` with the layer's rotary embedding.

        ``positions`` is ``(1, n)``, or ``(3, 1, n)`` for M-RoPE models, as the presses pass them.
        """
        if attention is None:
            raise ValueError("VLLMAdapter.apply_rope needs the attention layer (its rotary embedding)")
        _, heads, n, head_dim = states.shape
        flat = states[0].transpose(0, 1).reshape(n, heads * head_dim)
        flat_positions = positions[:, 0] if positions.dim() == 3 else positions[0]
        # vLLM's M-RoPE asserts a key is given; the queries themselves serve (the copy is dropped).
        rotated, _ = attention.module.rotary_emb.forward_native(flat_positions, flat, flat.clone())
        return rotated.reshape(n, heads, head_dim).transpose(0, 1)[None]

    def rotary_cos_sin(
        self, like: torch.Tensor, positions: torch.Tensor, attention: AttentionView | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the layer's rotary embedding at ``positions``, ``(1, n, rotary_dim)``.

        In transformers' layout, which :func:`mmshiftkv.models.adapter.rotate` reads for both
        rotation styles: two copies of the frequencies back to back (vLLM's cache holds each once).
        """
        if attention is None:
            raise ValueError("VLLMAdapter.rotary_cos_sin needs the attention layer (its rotary embedding)")
        rotary = attention.module.rotary_emb
        flat_positions = positions[:, 0] if positions.dim() == 3 else positions[0]
        cos, sin = rotary.cos_sin_cache.to(like.device, like.dtype)[flat_positions].chunk(2, dim=-1)
        if flat_positions.dim() == 2:
            section = rotary.mrope_section
            if getattr(rotary, "mrope_interleaved", False):
                # Qwen3-VL: the frequencies cycle through the axes (T, H, W, T, H, W, ...), as vLLM's own
                # forward lays them out.
                from vllm.model_executor.layers.rotary_embedding.mrope import apply_interleaved_rope

                cos, sin = apply_interleaved_rope(cos, section), apply_interleaved_rope(sin, section)
            else:
                # Each feature block takes the position of its own axis (temporal, height, width).
                cos = torch.cat([part[i] for i, part in enumerate(cos.split(section, dim=-1))], dim=-1)
                sin = torch.cat([part[i] for i, part in enumerate(sin.split(section, dim=-1))], dim=-1)
        return torch.cat([cos, cos], dim=-1)[None], torch.cat([sin, sin], dim=-1)[None]
