"""Structural model adapters and the tiny offline models used by tests and the demo."""

from mmshiftkv.models.adapter import ModelAdapter, UnsupportedModelError, find_decoder, get_adapter

__all__ = ["ModelAdapter", "UnsupportedModelError", "find_decoder", "get_adapter"]
