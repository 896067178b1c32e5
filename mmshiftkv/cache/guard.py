"""A cache holding :class:`CompressedLayer` layers refuses, before touching any layer, what they would refuse.

transformers' caches work layer by layer: ``crop`` crops each layer in turn, and a forward updates
layer 0 before layer 1. On a cache whose first layers are not compressed (sliding-window layers of
Gemma 3, the linear-attention state of Qwen3.5, layers an allocator left whole) a refusal raised by
the first compressed layer would come after the earlier layers were already cut or updated, and a
correct retry would then decode from a different cache. :func:`guard_cache` gives the cache a class
that checks every compressed layer first:

* ``crop`` checks that no compressed layer would be cut into its compressed prompt;
* the methods through which a forward changes a cache (``update``, the linear-attention state
  accessors ``get_conv_state`` / ``update_conv_state`` / ``get_recurrent_state`` /
  ``update_recurrent_state``, ``update_indexer``: those this release's class has) check that the
  running code is the compressed attention of the layers' model (:meth:`CompressedLayer.check_readable`).

The class is the cache's own class with these checks in front, built once per class and keeping its
name (``type(cache).__name__`` stays ``"DynamicCache"``, its module is this one); copies
(``copy.deepcopy``, the prompt-reuse recipe) and pickles keep it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import Cache

from mmshiftkv.cache.compressed_layer import CompressedLayer

#: Methods through which a forward changes a cache; the linear-attention state getters hand out the
#: tensors the model then updates in place.
FORWARD_ENTRY_POINTS = (
    "update",
    "get_conv_state",
    "update_conv_state",
    "get_recurrent_state",
    "update_recurrent_state",
    "update_indexer",
)

_GUARDED: dict[type, type] = {}


class GuardedCache:
    """Marks the classes :func:`guard_cache` builds (``isinstance(cache, GuardedCache)``)."""

    _unguarded: type

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return _new_guarded, (self._unguarded,), self.__dict__


def _compressed_layers(cache: Any) -> list[CompressedLayer]:
    return [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]


def _check_forward(cache: Any, *args: Any, **kwargs: Any) -> None:
    for layer in _compressed_layers(cache):
        layer.check_readable()


def _check_crop(cache: Any, *args: Any, **kwargs: Any) -> None:
    length = args[0] if args else next(iter(kwargs.values()))
    for layer in _compressed_layers(cache):
        layer.check_crop(length)


def _checked(method: Callable, check: Callable[..., None]) -> Callable:
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        check(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    checked.__name__ = method.__name__
    checked.__doc__ = method.__doc__
    return checked


def guarded_class(base: type) -> type:
    """``base`` (a :class:`transformers.Cache` class) with the checks of this module in front."""
    if issubclass(base, GuardedCache):
        return base
    guarded = _GUARDED.get(base)
    if guarded is None:
        namespace: dict[str, Any] = {
            name: _checked(getattr(base, name), _check_forward)
            for name in FORWARD_ENTRY_POINTS
            if callable(getattr(base, name, None))
        }
        namespace.update(
            crop=_checked(base.crop, _check_crop),
            _unguarded=base,
            __module__=__name__,
            __doc__=base.__doc__,
        )
        guarded = _GUARDED[base] = type(base.__name__, (GuardedCache, base), namespace)
    return guarded


def _new_guarded(base: type) -> Any:
    guarded = guarded_class(base)
    return guarded.__new__(guarded)


def guard_cache(cache: Cache) -> None:
    """Make ``cache`` check its :class:`CompressedLayer` layers before any layer is cropped or updated.

    Presses call it when they put a compressed layer in a cache; it changes the class of this one
    cache object only (to the guarded class of its class), and calling it again is a no-op.
    """
    cache.__class__ = guarded_class(type(cache))
