"""Argument checks shared by the model factories: one-line errors naming the bad value."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any


def int_arg(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` >= ``minimum`` (``TypeError`` / ``ValueError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def bool_arg(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``TypeError`` otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def float_arg(name: str, value: Any, minimum: float) -> float:
    """``value`` as a finite ``float`` > ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not minimum < float(value) < float("inf"):
        raise ValueError(f"{name} must be a finite number > {minimum}, got {value}")
    return float(value)


def ints_arg(name: str, value: Any, minimum: int) -> tuple[int, ...]:
    """A non-empty sequence of integers >= ``minimum`` as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name} must be a non-empty sequence of integers, got {value!r}")
    return tuple(int_arg(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))


def choice_arg(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (``ValueError`` listing them otherwise)."""
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def divisible(name: str, value: int, by_name: str, by: int) -> None:
    """``ValueError`` unless ``by`` divides ``value``."""
    if value % by:
        raise ValueError(f"{name}={value} must be divisible by {by_name}={by}")
