"""Summary: the compact text diagnosis behind ``GradWatch.summary()``.

It reads only host-side values (the flushed history mirror and the alert book), so formatting it
never touches the device.
"""

from __future__ import annotations

import numpy as np

from gradwatch.engine.advice import explain, merge_advice
from gradwatch.engine.alerts import Alert
from gradwatch.engine.history import NormHistory
from gradwatch.engine.text import display_name, fmt, format_layers

WORST_LAYERS = 3
"""How many layers the summary lists at each end (smallest and largest gradient norms).

Fewer with fewer than twice as many layers, so that no layer is listed at both ends.
"""

Episode = tuple[Alert, int, int, float]
"""``(first alert, last step, detections, peak value)`` of a condition."""


def format_summary(
    *,
    steps: int,
    layer_names: list[str],
    history: NormHistory,
    alerts: list[Alert],
    episodes: list[Episode],
) -> str:
    """A compact text diagnosis: norms of the worst layers, alerts, their story and advice.

    The advice of every alert is merged, without contradictions (see
    :func:`~gradwatch.engine.advice.merge_advice`); a divergence followed by alerts it commonly
    causes is told as one story (:func:`~gradwatch.engine.advice.explain`).

    Reads host values only (flush first, so that every recorded step is in the history mirror).

    Args:
        steps: Steps recorded.
        layer_names: Layers in forward order.
        history: The history (its host mirror is read).
        alerts: Every alert, oldest first.
        episodes: The latest episode of each alert kind.

    Returns:
        Several lines of text, ending with "No problems found." when there is no warning or error.
    """
    lines = [f"gradwatch summary: {steps} steps, {len(layer_names)} layers"]
    if len(history.host_steps):
        lines += _norm_lines(
            layer_names, history.host_steps, history.host_norms, history.host_total
        )
    else:
        lines.append("  no gradients recorded yet")
    if alerts:
        spans = {id(alert): (last, count) for alert, last, count, _ in episodes}
        lines += _alert_lines(alerts, spans)
    if not any(alert.severity in ("warning", "error") for alert in alerts):
        lines.append("No problems found.")
    return "\n".join(lines)


def _norm_lines(
    names: list[str], steps: np.ndarray, norms: np.ndarray, totals: np.ndarray
) -> list[str]:
    latest = norms[-1]
    step = int(steps[-1])
    lines = [
        f"gradient norms at step {step} (window: steps {int(steps[0])}-{step}): "
        f"total {fmt(float(totals[-1]))}, median total over the window "
        f"{fmt(float(np.nanmedian(totals))) if np.isfinite(totals).any() else 'n/a'}"
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
            f"  first/last layer norm ratio: {fmt(ratio)} "
            f"({display_name(names[0])} vs {display_name(names[-1])})"
        )
    return lines


def _layer_values(names: list[str], values: np.ndarray, indices: np.ndarray) -> str:
    return ", ".join(f"{display_name(names[i])} {fmt(float(values[i]))}" for i in indices)


def _alert_lines(alerts: list[Alert], episodes: dict[int, tuple[int, int]]) -> list[str]:
    lines = [f"alerts ({len(alerts)}):"]
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
    story = explain(alerts)
    if story is not None:
        lines.append(f"story: {story}")
    advice = merge_advice(alerts)
    if advice:
        lines.append("advice:")
        lines += [f"  - {item}" for item in advice]
    return lines
