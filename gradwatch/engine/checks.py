"""Argument checks shared by every constructor: errors name the argument and the bad value."""

from __future__ import annotations

import math
from collections.abc import Collection

MAX_STEPS = 10**9
"""Largest cadence or window a constructor accepts: a larger one is a typo (and would allocate
buffers of that many steps)."""


def check_int(name: str, value: object, *, minimum: int, maximum: int = MAX_STEPS) -> int:
    """``value`` as an int in ``[minimum, maximum]``, else an error naming it and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool (only ``True``/``False``: a truthy string is a mistake)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}: {value!r}")
    return value


def check_number(
    name: str,
    value: object,
    *,
    low: float,
    high: float | None = None,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float in ``(low, high]`` (``(low, high)`` with ``high_open``), else raises."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    number = float(value)
    bounds = f"({low:g}, {high:g}{')' if high_open else ']'}" if high is not None else f"> {low:g}"
    if (
        math.isnan(number)
        or (finite and math.isinf(number))
        or number <= low
        or (high is not None and (number >= high if high_open else number > high))
    ):
        raise ValueError(
            f"{name} must be {'in ' if high is not None else ''}{bounds}, got {value!r}"
        )
    return number


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float strictly between 0 and 1."""
    return check_number(name, value, low=0.0, high=1.0, high_open=True)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` as one of the ``allowed`` strings."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_names(
    name: str, value: object, allowed: tuple[str, ...], *, allow_empty: bool = False
) -> tuple[str, ...]:
    """``value`` (one name or a collection of names) as a tuple of names from ``allowed``."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Collection):
        raise TypeError(f"{name} must be a sequence of names from {allowed}, got {value!r}")
    names = tuple(names)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"{name} has unknown name(s) {unknown!r}: choose from {allowed}, got {value!r}"
        )
    if not names and not allow_empty:
        raise ValueError(f"{name} must name at least one of {allowed}, got {value!r}")
    return names
