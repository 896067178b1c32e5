"""Model-family adapters and the tiny offline models used by tests and the demo."""

from mmshiftkv.models.adapter import SUPPORTED_FAMILIES, ModelAdapter, UnsupportedModelError, get_adapter

__all__ = ["SUPPORTED_FAMILIES", "ModelAdapter", "UnsupportedModelError", "get_adapter"]
