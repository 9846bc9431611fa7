"""Argument checks shared by every constructor: one rule per kind of value, one message shape.

Each check raises ``ValueError`` (or the ``error`` class given) naming the argument, what is allowed and the value
received, so that bad input is reported once, where the object is built. Plain Python only (no torch, no numpy
import), so that ``lightning_dpgan.topology`` and the command line's checks stay light.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[Exception] = ValueError,
    why: str = "",
) -> int:
    """An integer (not a bool) in ``[minimum, maximum]``; returns it as ``int``. ``why`` says why the bound is there."""
    if not _is_integer(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(f"{name} must be an integer{_bounds(minimum, maximum, False, False)}, got {value!r}{f' ({why})' if why else ''}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = True,
    error: type[Exception] = ValueError,
) -> float:
    """A finite real number (not a bool) within the bounds; ``low_open``/``high_open`` exclude the bound itself."""
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise error(f"{name} must be a finite number{_bounds(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any, error: type[Exception] = ValueError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Collection[Any], error: type[Exception] = ValueError) -> Any:
    if value not in allowed:
        raise error(f"unknown {name} {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_number(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_number(high)}"
    return ""


def _number(value: float) -> str:
    return str(value) if _is_integer(value) else f"{value:g}"
