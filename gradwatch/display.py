"""How a watch shows itself: one line for ``repr`` and an HTML card for notebooks.

The HTML card (``GradWatch._repr_html_``, what Jupyter displays for a watch) holds the
gradient-flow image of the retained history window, drawn like the TensorBoard one (same fixed
colour scale, NaN/Inf in magenta), and the alerts, oldest first, with their advice.
"""

from __future__ import annotations

import base64
import html

import numpy as np

from gradwatch.engine.alerts import Alert
from gradwatch.engine.text import format_layers
from gradwatch.sinks.flow import FlowPlot, GradientFlow, matplotlib_available
from gradwatch.sinks.png import encode_png

IMAGE_WIDTH_PX = 525
"""Width of the notebook's gradient-flow image (1.5 times the TensorBoard one, same layout)."""


def flow_png(steps: np.ndarray, norms: np.ndarray, layer_names: list[str]) -> bytes | None:
    """The gradient-flow image of ``[k, L]`` norms at ``steps``, as PNG bytes (None when empty)."""
    if not len(steps):
        return None
    flow = GradientFlow(max_columns=192)
    flow.add(steps, norms)
    plot = FlowPlot(width=IMAGE_WIDTH_PX) if matplotlib_available() else None
    image = flow.render(layer_names, plot)
    return encode_png(image) if image is not None else None


def format_html(
    *,
    title: str,
    steps: np.ndarray,
    norms: np.ndarray,
    layer_names: list[str],
    alerts: list[Alert],
) -> str:
    """An HTML card: title, gradient-flow image of the window, alerts (oldest first) and advice.

    Args:
        title: The first line (what is watched, how far).
        steps: ``[k]`` steps of the retained window.
        norms: ``[k, L]`` their per-layer gradient norms.
        layer_names: Layers in forward order.
        alerts: Every alert, oldest first.
    """
    parts = [f"<div><p><b>{html.escape(title)}</b></p>"]
    png = flow_png(steps, norms, layer_names)
    if png is not None:
        source = base64.b64encode(png).decode("ascii")
        span = f"steps {int(steps[0])}-{int(steps[-1])}"
        parts.append(
            f'<img alt="gradient flow, {span}" src="data:image/png;base64,{source}"/>'
            f"<p>gradient flow over the retained window ({span}); magenta: NaN/Inf</p>"
        )
    else:
        parts.append("<p>no gradients recorded yet</p>")
    if alerts:
        rows = "".join(
            "<tr>"
            f"<td>{alert.step}</td><td>{html.escape(alert.kind.value)}</td>"
            f"<td>{html.escape(alert.severity)}</td>"
            f"<td>{html.escape(format_layers(alert.layers))}</td>"
            f"<td>{html.escape(alert.message)}</td>"
            "</tr>"
            for alert in alerts
        )
        parts.append(
            f"<p>alerts ({len(alerts)}, oldest first):</p><table>"
            "<tr><th>step</th><th>alert</th><th>severity</th><th>layers</th><th>message</th></tr>"
            f"{rows}</table>"
        )
        advice = list(dict.fromkeys(item for alert in alerts for item in alert.advice))
        if advice:
            items = "".join(f"<li>{html.escape(item)}</li>" for item in advice)
            parts.append(f"<p>advice:</p><ul>{items}</ul>")
    else:
        parts.append("<p>no alerts</p>")
    parts.append("</div>")
    return "".join(parts)


def format_repr(
    *,
    model: str,
    layers: int,
    steps: int,
    alerts: list[Alert],
    options: dict[str, str],
    closed: bool,
) -> str:
    """One line: ``GradWatch(Sequential, 30 layers, 60 steps, 1 alert [vanishing], ...)``.

    Args:
        model: The model's class name.
        layers: Number of watched layers.
        steps: Steps recorded.
        alerts: Alerts materialised so far.
        options: Options worth showing, already formatted (``{"log_every_n_steps": "50"}``).
        closed: Whether the watch was closed.

    Example:
        >>> format_repr(model="MLP", layers=3, steps=0, alerts=[], options={}, closed=False)
        'GradWatch(MLP, 3 layers, 0 steps, no alerts)'
    """
    kinds = sorted({alert.kind.value for alert in alerts})
    alert_text = f"{len(alerts)} alert{'s' if len(alerts) != 1 else ''} [{', '.join(kinds)}]"
    fields = [
        model,
        f"{layers} layer{'s' if layers != 1 else ''}",
        f"{steps} step{'s' if steps != 1 else ''}",
        alert_text if alerts else "no alerts",
        *(f"{key}={value}" for key, value in options.items()),
    ]
    if closed:
        fields.append("closed")
    return f"GradWatch({', '.join(fields)})"
