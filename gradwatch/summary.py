"""Summary: the compact text diagnosis behind ``GradWatch.summary()``.

It reads only host-side values (the flushed history mirror and the alert book), so formatting it
never touches the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gradwatch.alerts import Alert

if TYPE_CHECKING:
    from gradwatch.watch import GradWatch

WORST_LAYERS = 3
"""How many layers the summary lists at each end (smallest and largest gradient norms).

Fewer with fewer than twice as many layers, so that no layer is listed at both ends.
"""

_MAX_NAMED_LAYERS = 4


def format_summary(watch: GradWatch) -> str:
    """A compact text diagnosis of ``watch``: norms of the worst layers, alerts and advice.

    Call after :meth:`GradWatch.flush` (``GradWatch.summary()`` does), so that every recorded step
    is in the host mirror.

    Args:
        watch: The watch to describe; it may have recorded zero steps.

    Returns:
        Several lines of text, ending with "No problems found." when there is no warning or error.
    """
    names = watch.layer_names
    lines = [f"gradwatch summary: {watch.step_count} steps, {len(names)} layers"]
    history = getattr(watch, "_history", None)
    if history is not None and len(history.host_steps):
        lines += _norm_lines(names, history.host_steps, history.host_norms, history.host_total)
    else:
        lines.append("  no gradients recorded yet")
    alerts = watch.alerts
    if alerts:
        lines += _alert_lines(alerts, _episodes(watch))
    if not any(alert.severity in ("warning", "error") for alert in alerts):
        lines.append("No problems found.")
    return "\n".join(lines)


def display_name(name: str) -> str:
    """A layer name as shown to people: the root module ``""`` is ``<root>``."""
    return name or "<root>"


def format_layers(layers: tuple[str, ...] | list[str], limit: int = _MAX_NAMED_LAYERS) -> str:
    """``"0, 2, 4 (+3 more)"``: the first ``limit`` layer names and how many were left out."""
    shown = ", ".join(display_name(name) for name in layers[:limit])
    return shown + (f" (+{len(layers) - limit} more)" if len(layers) > limit else "")


def _norm_lines(
    names: list[str], steps: np.ndarray, norms: np.ndarray, totals: np.ndarray
) -> list[str]:
    latest = norms[-1]
    step = int(steps[-1])
    lines = [
        f"gradient norms at step {step} (window: steps {int(steps[0])}-{step}): "
        f"total {_fmt(float(totals[-1]))}, median total over the window "
        f"{_fmt(float(np.nanmedian(totals))) if np.isfinite(totals).any() else 'n/a'}"
    ]
    finite = np.flatnonzero(np.isfinite(latest))
    broken = np.flatnonzero(~np.isfinite(latest))
    if len(broken):
        lines.append(f"  non-finite: {format_layers([names[i] for i in broken])}")
    if len(finite):
        order = finite[np.argsort(latest[finite], kind="stable")]
        count = max(1, min(WORST_LAYERS, len(order) // 2))  # no overlap unless one layer
        lines.append(f"  smallest: {_layer_values(names, latest, order[:count])}")
        lines.append(f"  largest:  {_layer_values(names, latest, order[::-1][:count])}")
    if len(names) > 1:
        first, last = float(latest[0]), float(latest[-1])
        ratio = first / last if last > 0 else float("nan")
        lines.append(
            f"  first/last layer norm ratio: {_fmt(ratio)} "
            f"({display_name(names[0])} vs {display_name(names[-1])})"
        )
    return lines


def _layer_values(names: list[str], values: np.ndarray, indices: np.ndarray) -> str:
    return ", ".join(f"{display_name(names[i])} {_fmt(float(values[i]))}" for i in indices)


def _episodes(watch: GradWatch) -> dict[int, tuple[int, int]]:
    """``id(alert) -> (last step, detections)`` for the latest episode of each kind."""
    book = getattr(watch, "_book", None)
    if book is None:
        return {}
    return {id(alert): (last, count) for alert, last, count, _ in book.episodes()}


def _alert_lines(alerts: list[Alert], episodes: dict[int, tuple[int, int]]) -> list[str]:
    lines = [f"alerts ({len(alerts)}):"]
    advice: dict[str, None] = {}
    for alert in alerts:
        span = ""
        if id(alert) in episodes:
            last, count = episodes[id(alert)]
            if last > alert.step:
                span = f" to {last} ({count} detections)"
        where = f" in {format_layers(alert.layers)}" if alert.layers else ""
        lines.append(
            f"  [{alert.severity}] {alert.kind.value} from step {alert.step}{span}{where}: "
            f"{alert.message}"
        )
        advice.update(dict.fromkeys(alert.advice))
    if advice:
        lines.append("advice:")
        lines += [f"  - {item}" for item in advice]
    return lines


def _fmt(value: float) -> str:
    return f"{value:.3g}" if np.isfinite(value) else str(value)
