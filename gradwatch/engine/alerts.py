"""Alerts: what gradwatch tells a person, and the book that deduplicates them."""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from dataclasses import dataclass
from typing import Any

from gradwatch.engine.thresholds import ALERT_CLEAR_STEPS, ALERT_ESCALATION

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
    ZERO_GRAD = "zero_grad"
    """Layers whose gradient is exactly zero for many steps: nothing reaches them."""
    AMP_OVERFLOW = "amp_overflow"
    NONFINITE_BUFFERS = "nonfinite_buffers"
    """Running statistics of normalisation layers (BatchNorm...) are NaN/Inf: evaluation breaks."""


SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Alert:
    """One diagnosis, materialised on the host (at a flush, or at once for a new warning/error).

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


ESCALATING: dict[AlertKind, float] = {
    AlertKind.EXPLODING: 1.0,
    AlertKind.SPIKE: 1.0,
    AlertKind.VANISHING: -1.0,
    AlertKind.STAGNATION: -1.0,
}
"""Kinds whose value is a magnitude, and its direction: +1 when larger is worse, -1 for ratios
where smaller is worse. The other kinds' values are counts or fractions and never escalate."""

SPREADING = frozenset({AlertKind.NONFINITE, AlertKind.NONFINITE_BUFFERS})
"""Kinds whose condition spreads by itself: a NaN reaches other layers and modules at the next
steps (through the weights it poisoned), which is the same event, not news in other layers."""


@dataclass
class _Span:
    """The detections an alert stands for: ``count`` of them up to ``last_step``, the worst
    value ``peak``."""

    last_step: int
    count: int
    peak: float


@dataclass
class _Episode:
    """An open condition of one kind: its latest alert and every layer it named so far."""

    index: int  # of its latest alert in ``AlertBook.alerts``
    last_step: int
    layers: set[str]


class AlertBook:
    """Keeps every alert and merges a continuing condition into one, never hiding a new event.

    Each kind has at most one open episode. A detection continues it (no new alert, the latest
    alert's span grows) unless one of these makes it news, which is a new alert:

    - the condition cleared: no detection for more than ``clear_after`` steps;
    - it escalated: its value is ``escalation`` times worse than the worst value since the
      episode's latest alert (kinds in :data:`ESCALATING`);
    - it moved: it names layers, the episode named layers, and none of them are the same (not for
      :data:`SPREADING` kinds: a NaN reaching other layers is the same event).

    The book only records: the frontend logs and dispatches new alerts, after the sinks have the
    flush.

    Example:
        >>> book = AlertBook(clear_after=10)
        >>> alert = Alert(AlertKind.SPIKE, 5, ("fc",), 4.0, 6.0, "warning", "jump")
        >>> book.record(alert) is alert
        True
        >>> detections = [(9, 5.0), (30, 5.0), (9, 80.0)]  # steady, cleared, escalated
        >>> [book.continues(AlertKind.SPIKE, s, v, ("fc",)) for s, v in detections]
        [True, False, False]

    Args:
        clear_after: Steps without a detection after which a condition counts as cleared.
        escalation: Factor by which a value must worsen to be a new alert within an episode.
    """

    def __init__(
        self, clear_after: int = ALERT_CLEAR_STEPS, escalation: float = ALERT_ESCALATION
    ) -> None:
        self.clear_after = clear_after
        self.escalation = escalation
        self.alerts: list[Alert] = []
        self._spans: list[_Span] = []
        self._open: dict[AlertKind, _Episode] = {}

    def continues(
        self,
        kind: AlertKind,
        step: int,
        value: float,
        layers: tuple[str, ...],
        seen: int | None = None,
    ) -> bool:
        """Whether a detection continues the open episode of its kind (False: it is news).

        Args:
            kind: The detection's kind.
            step: Its step.
            value: Its value.
            layers: The layers it names.
            seen: A later step where the caller saw this kind detected, not yet recorded here.
        """
        episode = self._open.get(kind)
        if episode is None:
            return False
        last = episode.last_step if seen is None else max(episode.last_step, seen)
        if step > last + self.clear_after:
            return False
        if (
            kind not in SPREADING
            and layers
            and episode.layers
            and episode.layers.isdisjoint(layers)
        ):
            return False
        return not self._escalates(kind, value, self._spans[episode.index].peak)

    def record(self, alert: Alert, last_step: int | None = None, count: int = 1) -> Alert | None:
        """Adds ``count`` detections from ``alert.step`` to ``last_step`` (default: that step)
        described by ``alert``; returns the alert if it is news (see :meth:`continues`)."""
        last = alert.step if last_step is None else max(last_step, alert.step)
        kind = alert.kind
        if self.continues(kind, alert.step, alert.value, alert.layers):
            self.extend(kind, last, alert.value, alert.layers, count)
            return None
        layers = set(alert.layers)
        episode = self._open.get(kind)
        if episode is not None and alert.step <= episode.last_step + self.clear_after:
            layers |= episode.layers  # news within a condition that goes on: its layers stay
        self.alerts.append(alert)
        self._spans.append(_Span(last, count, alert.value))
        self._open[kind] = _Episode(len(self.alerts) - 1, max(last, self._last(kind)), layers)
        return alert

    def extend(
        self, kind: AlertKind, step: int, value: float, layers: tuple[str, ...], count: int = 1
    ) -> None:
        """Adds detections that :meth:`continues` the open episode of ``kind``."""
        episode = self._open[kind]
        span = self._spans[episode.index]
        episode.last_step = max(episode.last_step, step)
        episode.layers.update(layers)
        span.last_step = max(span.last_step, step)
        span.count += count
        span.peak = self._worst(kind, span.peak, value)

    def episodes(self) -> list[tuple[Alert, int, int, float]]:
        """Every alert with its span: ``(alert, last step, detections, peak value)``."""
        return [
            (alert, span.last_step, span.count, span.peak)
            for alert, span in zip(self.alerts, self._spans, strict=True)
        ]

    def counts(self) -> dict[AlertKind, int]:
        """Number of alerts so far per kind."""
        out: dict[AlertKind, int] = {}
        for alert in self.alerts:
            out[alert.kind] = out.get(alert.kind, 0) + 1
        return out

    def state_dict(self) -> dict:
        """Plain-value state: every alert with its span, and the open episodes."""
        return {
            "alerts": [alert_to_dict(a) for a in self.alerts],
            "spans": [[s.last_step, s.count, s.peak] for s in self._spans],
            "open": {
                k.value: {
                    "index": e.index,
                    "last_step": e.last_step,
                    "count": self._spans[e.index].count,
                    "peak": self._spans[e.index].peak,
                    "layers": sorted(e.layers),
                }
                for k, e in self._open.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` returned (also the older format without spans)."""
        self.alerts = [alert_from_dict(a) for a in state.get("alerts", [])]
        spans = state.get("spans")
        if isinstance(spans, list) and len(spans) == len(self.alerts):
            self._spans = [_Span(int(s[0]), int(s[1]), float(s[2])) for s in spans]
        else:
            self._spans = [_Span(a.step, 1, a.value) for a in self.alerts]
        self._open = {}
        for kind, e in state.get("open", {}).items():
            index = int(e["index"])
            alert = self.alerts[index]
            if "spans" not in state:  # older format: the open episode's numbers
                self._spans[index] = _Span(int(e["last_step"]), int(e["count"]), float(e["peak"]))
            layers = set(e.get("layers", alert.layers))
            self._open[AlertKind(kind)] = _Episode(index, int(e["last_step"]), layers)

    def _last(self, kind: AlertKind) -> int:
        episode = self._open.get(kind)
        return episode.last_step if episode is not None else -1

    def _escalates(self, kind: AlertKind, value: float, peak: float) -> bool:
        direction = ESCALATING.get(kind)
        if direction is None or not peak > 0 or math.isnan(value):
            return False
        if direction > 0:
            return abs(value) >= self.escalation * abs(peak)
        return 0 <= value <= peak / self.escalation

    @staticmethod
    def _worst(kind: AlertKind, peak: float, value: float) -> float:
        if ESCALATING.get(kind, 1.0) < 0:
            return min(peak, value, key=_magnitude)
        return max(peak, value, key=_magnitude)


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
