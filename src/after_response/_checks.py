"""Checks shared by every option: a value of the wrong type (a string where a number is meant,
a float or a bool where an int is) raises ``TypeError``; a value of the right type out of its
range raises ``ValueError``. Wrong types are named by their type, never shown."""

from __future__ import annotations

import math
from typing import Literal, overload


def is_number(value: object) -> bool:
    """An int or a float, not a bool (``True`` is an int to Python, never a number of seconds)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(what: str, value: object, expected: str) -> float:
    """``value``, or ``TypeError("{what} must be {expected}, got str")`` unless it is a number."""
    if not is_number(value):
        raise TypeError(f"{what} must be {expected}, got {_kind(value)}")
    return value  # type: ignore[return-value]


def check_int(what: str, value: object, expected: str) -> int:
    """``value``, or ``TypeError("{what} must be {expected}, got float")`` unless it is an int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be {expected}, got {_kind(value)}")
    return value


@overload
def check_seconds(what: str, value: object, *, or_none: Literal[False]) -> float: ...
@overload
def check_seconds(what: str, value: object, *, or_none: bool = True) -> float | None: ...
def check_seconds(what: str, value: object, *, or_none: bool = True) -> float | None:
    """``value`` if it is a positive finite number of seconds (or ``None`` when ``or_none``).

    Raises:
        TypeError: when it is not a number.
        ValueError: when it is zero, negative, infinite or NaN.
    """
    if value is None and or_none:
        return None
    expected = "a positive number of seconds" + (" or None" if or_none else "")
    seconds = check_number(what, value, expected)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{what} must be {expected}, got {value!r}")
    return float(seconds)


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__
