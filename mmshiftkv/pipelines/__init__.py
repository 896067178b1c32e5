"""Hugging Face pipelines; importing this package registers ``"kv-press-vqa"``."""

from mmshiftkv.pipelines.vqa import KVPressVQAPipeline, register

register()

__all__ = ["KVPressVQAPipeline", "register"]
