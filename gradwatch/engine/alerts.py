"""Alerts: what gradwatch tells a person, and the book that deduplicates them."""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass
from typing import Any

from gradwatch.engine.thresholds import ALERT_COOLDOWN

logger = logging.getLogger("gradwatch")


class AlertKind(str, enum.Enum):
    """The gradient pathologies gradwatch recognises."""

    VANISHING = "vanishing"
    EXPLODING = "exploding"
    SPIKE = "spike"
    NONFINITE = "nonfinite"
    SATURATION = "saturation"
    DEAD_UNITS = "dead_units"
    STAGNATION = "stagnation"
    AMP_OVERFLOW = "amp_overflow"
    NONFINITE_BUFFERS = "nonfinite_buffers"
    """Running statistics of normalisation layers (BatchNorm...) are NaN/Inf: evaluation breaks."""


SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Alert:
    """One diagnosis, materialised on the host at a flush.

    Attributes:
        kind: Which pathology.
        step: The step where the condition was first detected.
        layers: Layer names, most responsible first (e.g. the origin of a NaN).
        value: The measured quantity that crossed the threshold.
        threshold: The threshold it crossed.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: One sentence a person can act on.
        advice: Remedies that fit this model.
    """

    kind: AlertKind
    step: int
    layers: tuple[str, ...]
    value: float
    threshold: float
    severity: str
    message: str
    advice: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"[{self.severity}] step {self.step}: {self.message}"
        if self.advice:
            text += " Try: " + "; ".join(self.advice) + "."
        return text


class GradientError(RuntimeError):
    """Raised when ``nonfinite="raise"`` and a gradient, the loss or an activation is NaN/Inf."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(str(alert))
        self.alert = alert


@dataclass
class _Episode:
    alert: Alert
    last_step: int
    count: int
    peak: float


class AlertBook:
    """Keeps every alert and merges a sustained condition into one.

    A detection belongs to the open episode of its kind when it starts within ``cooldown`` steps of
    that episode's last detection; otherwise it opens a new episode and a new alert. The book only
    records: the frontend logs and dispatches new alerts, after the sinks have the flush.

    Args:
        cooldown: Steps without a detection after which a condition counts as over.
    """

    def __init__(self, cooldown: int = ALERT_COOLDOWN) -> None:
        self.cooldown = cooldown
        self.alerts: list[Alert] = []
        self._open: dict[AlertKind, _Episode] = {}

    def record(self, alert: Alert, last_step: int, count: int) -> Alert | None:
        """Adds a detection window; returns the alert if it opens a new episode."""
        episode = self._open.get(alert.kind)
        if episode is not None and alert.step <= episode.last_step + self.cooldown:
            episode.last_step = max(episode.last_step, last_step)
            episode.count += count
            episode.peak = max(episode.peak, alert.value, key=_magnitude)
            return None
        self._open[alert.kind] = _Episode(alert, last_step, count, alert.value)
        self.alerts.append(alert)
        return alert

    def episodes(self) -> list[tuple[Alert, int, int, float]]:
        """Open and past episodes as ``(first alert, last step, detections, peak value)``."""
        return [(e.alert, e.last_step, e.count, e.peak) for e in self._open.values()]

    def counts(self) -> dict[AlertKind, int]:
        """Number of alerts so far per kind."""
        out: dict[AlertKind, int] = {}
        for alert in self.alerts:
            out[alert.kind] = out.get(alert.kind, 0) + 1
        return out

    def state_dict(self) -> dict:
        """Plain-value state: every alert and the open episodes."""
        return {
            "alerts": [alert_to_dict(a) for a in self.alerts],
            "open": {
                k.value: {
                    "index": self.alerts.index(e.alert),
                    "last_step": e.last_step,
                    "count": e.count,
                    "peak": e.peak,
                }
                for k, e in self._open.items()
                if e.alert in self.alerts
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.alerts = [alert_from_dict(a) for a in state.get("alerts", [])]
        self._open = {}
        for kind, e in state.get("open", {}).items():
            alert = self.alerts[e["index"]]
            self._open[AlertKind(kind)] = _Episode(alert, e["last_step"], e["count"], e["peak"])


def _magnitude(value: float) -> float:
    return abs(value) if value == value else float("inf")


def alert_to_dict(alert: Alert) -> dict[str, Any]:
    """An alert as plain values (for state dicts and JSON)."""
    out = dataclasses.asdict(alert)
    out["kind"] = alert.kind.value
    out["layers"] = list(alert.layers)
    out["advice"] = list(alert.advice)
    return out


def alert_from_dict(data: dict[str, Any]) -> Alert:
    """The alert :func:`alert_to_dict` described."""
    return Alert(
        kind=AlertKind(data["kind"]),
        step=int(data["step"]),
        layers=tuple(data["layers"]),
        value=float(data["value"]),
        threshold=float(data["threshold"]),
        severity=str(data["severity"]),
        message=str(data["message"]),
        advice=tuple(data.get("advice", ())),
    )
