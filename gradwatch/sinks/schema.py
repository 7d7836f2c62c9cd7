"""The TensorBoard tag schema and the alert text format: written by the sinks, read by ``report``.

| tag | what |
|---|---|
| ``gradwatch/grad_norm/<layer>`` | per-layer gradient norm, at each flush |
| ``gradwatch/grad_norm_total`` | total norm before any remedy, every step |
| ``gradwatch/weight_norm/<layer>``, ``gradwatch/update_ratio/<layer>`` | at each flush |
| ``gradwatch/clip_coef``, ``gradwatch/lr_scale`` | every step, when a remedy is on |
| ``gradwatch/alerts/<kind>``, ``gradwatch/alerts`` | alert counts, alert text with advice |
| ``gradwatch/grad_hist/<layer>`` | gradient histograms |
| ``gradwatch/gradient_flow`` | the layers x steps image |

The root layer ``""`` is written as ``<root>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gradwatch.engine.alerts import Alert
from gradwatch.engine.text import display_name

PREFIX = "gradwatch"
TOTAL_TAG = f"{PREFIX}/grad_norm_total"
CLIP_TAG = f"{PREFIX}/clip_coef"
LR_SCALE_TAG = f"{PREFIX}/lr_scale"
ALERTS_TAG = f"{PREFIX}/alerts"
FLOW_TAG = f"{PREFIX}/gradient_flow"
GRAD_NORM_FAMILY = "grad_norm"
CUSTOM_SCALARS_CATEGORY = "gradwatch"
_ALERT_HEADER = re.compile(
    r"^\*\*(?P<kind>\w+)\*\* \((?P<severity>\w+)\) at step (?P<step>-?\d+)"
    r"(?:, layers: (?P<layers>.*))?$"
)


def layer_tag(family: str, layer: str, prefix: str = PREFIX) -> str:
    """The tag of one layer's series, e.g. ``gradwatch/grad_norm/encoder.0`` (root: ``<root>``)."""
    return f"{prefix}/{family}/{display_name(layer)}"


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: one multiline chart per family (tags are regular expressions)."""
    return {
        CUSTOM_SCALARS_CATEGORY: {
            "gradient norm per layer": ["Multiline", [f"^{PREFIX}/grad_norm/"]],
            "weight norm per layer": ["Multiline", [f"^{PREFIX}/weight_norm/"]],
            "update/weight ratio per layer": ["Multiline", [f"^{PREFIX}/update_ratio/"]],
            "total gradient norm, clip coefficient, LR scale": [
                "Multiline",
                [f"^{TOTAL_TAG}$", f"^{CLIP_TAG}$", f"^{LR_SCALE_TAG}$"],
            ],
        }
    }


def format_alert_markdown(alert: Alert) -> str:
    """The ``gradwatch/alerts`` text of an alert (Markdown; ``gradwatch report`` parses it back)."""
    header = f"**{alert.kind.value}** ({alert.severity}) at step {alert.step}"
    if alert.layers:
        header += ", layers: " + ", ".join(f"`{display_name(name)}`" for name in alert.layers)
    text = f"{header}\n\n{alert.message}"
    if alert.advice:
        text += "\n\nAdvice:\n" + "\n".join(f"- {item}" for item in alert.advice)
    return text


@dataclass
class ReportedAlert:
    """An alert read back from the ``gradwatch/alerts`` text.

    Attributes:
        kind: Alert kind value (``"vanishing"``...).
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        step: Step where it was detected.
        layers: Layers named by the alert, most responsible first.
        message: Its sentence.
        advice: Remedies that fit the model.
    """

    kind: str
    severity: str
    step: int
    layers: list[str]
    message: str
    advice: list[str]


def parse_alert_markdown(text: str) -> ReportedAlert | None:
    """Parses the text the TensorBoard sink writes for one alert (None if it is not one)."""
    lines = text.strip().splitlines()
    match = _ALERT_HEADER.match(lines[0].strip()) if lines else None
    if match is None:
        return None
    layers = re.findall(r"`([^`]*)`", match.group("layers") or "")
    message_lines: list[str] = []
    advice: list[str] = []
    in_advice = False
    for line in lines[1:]:
        stripped = line.strip()
        if stripped == "Advice:":
            in_advice = True
        elif in_advice and stripped.startswith("- "):
            advice.append(stripped[2:])
        elif stripped and not in_advice:
            message_lines.append(stripped)
    return ReportedAlert(
        kind=match.group("kind"),
        severity=match.group("severity"),
        step=int(match.group("step")),
        layers=layers,
        message=" ".join(message_lines),
        advice=advice,
    )
