"""Structural model adapters: what a press needs to know about a model, found from its structure."""

from mmshiftkv.models.adapter import ModelAdapter, UnsupportedModelError, find_decoder, get_adapter

__all__ = ["ModelAdapter", "UnsupportedModelError", "find_decoder", "get_adapter"]
