"""Type and range checks shared by the presses, allocators, pipeline and evaluation configs.

Each check raises with the field's name and the offending value, so a bad configuration fails
when it is built, not deep inside a generate call. ``bool`` is refused where a number is asked
for (``True`` is an ``int`` in Python, but ``window_size=True`` is a mistake, not a window).
"""

from __future__ import annotations

import math
import numbers


def check_int(value: object, name: str, minimum: int | None = None) -> None:
    """Raise unless ``value`` is an int (not a bool) and, when given, ``>= minimum``.

    Raises
    ------
    TypeError
        If ``value`` is not an integer (a float such as ``1.5`` or ``2.0`` included).
    ValueError
        If ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_pooling_kernel(value: object, name: str = "kernel_size") -> None:
    """Raise unless ``value`` is a positive odd int: an average-pooling kernel centred on each token."""
    check_int(value, name, minimum=1)
    if value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd number, got {value}")


def check_real(value: object, name: str) -> None:
    """Raise unless ``value`` is a finite real number (an int or a float, not a bool, NaN or inf).

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If ``value`` is NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_bool(value: object, name: str) -> None:
    """Raise :class:`TypeError` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
