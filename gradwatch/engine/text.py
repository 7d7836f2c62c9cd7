"""How layer names and numbers are written for people, everywhere gradwatch writes text."""

from __future__ import annotations

import math
from collections.abc import Sequence

ROOT_NAME = "<root>"
"""How the root module's layer (name ``""``) is shown and tagged."""

NAMED_LAYERS = 4
"""How many names a list of layers shows before "(+N more)"."""


def display_name(name: str) -> str:
    """A layer name as shown to people: the root module ``""`` is ``<root>``."""
    return name or ROOT_NAME


def format_layers(layers: Sequence[str], limit: int = NAMED_LAYERS) -> str:
    """``"0, 2, 4 (+3 more)"``: the first ``limit`` layer names and how many were left out.

    Example:
        >>> format_layers(["", "fc1", "fc2"], limit=2)
        '<root>, fc1 (+1 more)'
    """
    shown = ", ".join(display_name(name) for name in layers[:limit])
    return shown + (f" (+{len(layers) - limit} more)" if len(layers) > limit else "")


def fmt(value: float) -> str:
    """A number with three significant digits (``nan``/``inf`` as such).

    Example:
        >>> fmt(0.000123456), fmt(float("nan"))
        ('0.000123', 'nan')
    """
    return f"{value:.3g}" if math.isfinite(value) else str(value)
