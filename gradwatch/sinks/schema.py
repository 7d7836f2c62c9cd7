"""The TensorBoard tag schema and the alert text format: written by the sinks, read by ``report``.

Every tag gradwatch writes is defined here:

- every step: ``gradwatch/grad_norm_total`` (total norm before any remedy);
  ``gradwatch/depth/{input,middle,output}_third_log10`` (log10 gradient norm of the first, middle
  and last third of the layers, forward order), ``gradwatch/depth/all_layers_log10`` (log10 of the
  total norm) and ``gradwatch/depth/all_layers_peak_log10`` (its largest value so far);
  ``gradwatch/clip_coef`` and ``gradwatch/lr_scale`` with a remedy;
- each flush, per layer: ``gradwatch/grad_norm/<layer>`` (newest step),
  ``gradwatch/grad_norm_max/<layer>``, ``grad_norm_min``, ``grad_norm_median`` (largest, smallest
  and median finite norm over the steps of the flush), ``gradwatch/grad_norm_nonfinite/<layer>``
  (steps of the flush whose norm was NaN/Inf, when there were any),
  ``gradwatch/weight_norm/<layer>`` and ``gradwatch/update_ratio/<layer>``;
- alerts: ``gradwatch/alerts/<kind>`` (alerts so far, at the step of each alert),
  ``gradwatch/alerts`` (text: one alert with its advice, at its step), ``gradwatch/alert_log``
  (text: every alert so far, oldest first, at each flush with a new alert);
- ``gradwatch/grad_hist/<layer>`` (histograms), ``gradwatch/gradient_flow`` (image: log10 gradient
  norm, layers x steps) and the custom-scalars layout.

The ``log10`` values are NaN where the norm is 0, NaN or Inf (TensorBoard marks NaN points and keeps
smoothing the rest, where an Inf would flatten the smoothed curve from then on). The root layer
``""`` is written as ``<root>``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch.engine.alerts import Alert
from gradwatch.engine.records import FlushRecord
from gradwatch.engine.text import display_name

PREFIX = "gradwatch"
TOTAL_TAG = f"{PREFIX}/grad_norm_total"
CLIP_TAG = f"{PREFIX}/clip_coef"
LR_SCALE_TAG = f"{PREFIX}/lr_scale"
ALERTS_TAG = f"{PREFIX}/alerts"
ALERT_LOG_TAG = f"{PREFIX}/alert_log"
FLOW_TAG = f"{PREFIX}/gradient_flow"
CUSTOM_SCALARS_TAG = "custom_scalars__config__"  # where TensorBoard's plugin looks for the layout

GRAD_NORM_FAMILY = "grad_norm"
WINDOW_MAX_FAMILY = "grad_norm_max"
WINDOW_MIN_FAMILY = "grad_norm_min"
WINDOW_MEDIAN_FAMILY = "grad_norm_median"
NONFINITE_FAMILY = "grad_norm_nonfinite"
WEIGHT_NORM_FAMILY = "weight_norm"
UPDATE_RATIO_FAMILY = "update_ratio"
GRAD_HIST_FAMILY = "grad_hist"
LAYER_FAMILIES = (
    GRAD_NORM_FAMILY,
    WINDOW_MAX_FAMILY,
    WINDOW_MIN_FAMILY,
    WINDOW_MEDIAN_FAMILY,
    NONFINITE_FAMILY,
    WEIGHT_NORM_FAMILY,
    UPDATE_RATIO_FAMILY,
    GRAD_HIST_FAMILY,
)

DEPTH_FAMILY = "depth"
DEPTH_BANDS = ("input_third", "middle_third", "output_third")
ALL_LAYERS = "all_layers"
PEAK = "all_layers_peak"

MAX_LOGGED_ALERTS = 100
"""Alerts the ``alert_log`` text lists: the first fifth and the newest, when there are more."""

_ALERT_HEADER = re.compile(
    r"^\*\*(?P<kind>\w+)\*\* \((?P<severity>\w+)\) at step (?P<step>-?\d+)"
    r"(?:, layers: (?P<layers>.*))?$"
)


def layer_tag(family: str, layer: str, prefix: str = PREFIX) -> str:
    """The tag of one layer's series, e.g. ``gradwatch/grad_norm/encoder.0`` (root: ``<root>``)."""
    return f"{prefix}/{family}/{display_name(layer)}"


def depth_tag(band: str, prefix: str = PREFIX) -> str:
    """The tag of a depth band's log10 gradient norm, e.g. ``gradwatch/depth/input_third_log10``."""
    return f"{prefix}/{DEPTH_FAMILY}/{band}_log10"


def depth_bands(num_layers: int) -> list[tuple[str, slice]]:
    """The depth bands of ``num_layers`` layers in forward order: thirds (the first ones one layer
    larger when the count does not divide); with two layers the first and the last; none with one.

    Example:
        >>> depth_bands(4)
        [('input_third', slice(0, 2, None)), ('middle_third', slice(2, 3, None)), \
('output_third', slice(3, 4, None))]
    """
    if num_layers < 2:
        return []
    if num_layers == 2:
        return [(DEPTH_BANDS[0], slice(0, 1)), (DEPTH_BANDS[2], slice(1, 2))]
    base, extra = divmod(num_layers, 3)
    sizes = [base + (1 if index < extra else 0) for index in range(3)]
    bounds = np.cumsum([0, *sizes])
    return [
        (band, slice(int(start), int(end)))
        for band, start, end in zip(DEPTH_BANDS, bounds[:-1], bounds[1:], strict=True)
    ]


def log10_or_nan(values: np.ndarray) -> np.ndarray:
    """``log10`` of positive finite values; NaN for 0, NaN and Inf."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (values > 0)
    return np.where(ok, np.log10(np.where(ok, values, 1.0)), np.nan)


@dataclass(frozen=True)
class Chart:
    """One custom-scalars chart: every tag matching one of ``tags`` (regular expressions)."""

    title: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Category:
    """A group of custom-scalars charts; a ``closed`` one starts collapsed."""

    title: str
    charts: tuple[Chart, ...]
    closed: bool = False


def custom_scalars_layout(*, remedies: bool = False) -> list[Category]:
    """The CUSTOM SCALARS dashboard: the overview first, the per-layer charts collapsed below.

    Args:
        remedies: Include the chart of the remedies' clip coefficient and LR scale.
    """
    bands = "|".join(band for band in DEPTH_BANDS)
    overview = [
        Chart(
            "log10 gradient norm by depth: input, middle and output third of the layers",
            (f"^{PREFIX}/{DEPTH_FAMILY}/({bands})_log10$",),
        ),
        Chart(
            "log10 total gradient norm and its peak so far",
            (f"^{PREFIX}/{DEPTH_FAMILY}/({ALL_LAYERS}|{PEAK})_log10$",),
        ),
        Chart("alerts so far, by kind", (f"^{ALERTS_TAG}/",)),
    ]
    if remedies:
        overview.append(
            Chart(
                "remedies: clip coefficient and LR scale (1 = untouched)",
                (f"^{CLIP_TAG}$", f"^{LR_SCALE_TAG}$"),
            )
        )
    per_layer = (
        Chart("gradient norm per layer", (f"^{PREFIX}/{GRAD_NORM_FAMILY}/",)),
        Chart(
            "gradient norm per layer, largest of each window", (f"^{PREFIX}/{WINDOW_MAX_FAMILY}/",)
        ),
        Chart(
            "gradient norm per layer, median of each window",
            (f"^{PREFIX}/{WINDOW_MEDIAN_FAMILY}/",),
        ),
        Chart("total gradient norm (before remedies)", (f"^{TOTAL_TAG}$",)),
        Chart("weight norm per layer", (f"^{PREFIX}/{WEIGHT_NORM_FAMILY}/",)),
        Chart("update/weight ratio per layer", (f"^{PREFIX}/{UPDATE_RATIO_FAMILY}/",)),
    )
    return [
        Category("gradwatch: overview", tuple(overview)),
        Category("gradwatch: per layer (linear scale)", per_layer, closed=True),
    ]


def layout_as_dict(layout: list[Category]) -> dict[str, dict[str, list[Any]]]:
    """The layout in ``SummaryWriter.add_custom_scalars`` form (which cannot say ``closed``)."""
    return {
        category.title: {chart.title: ["Multiline", list(chart.tags)] for chart in category.charts}
        for category in layout
    }


class ScalarTags:
    """Turns flush records into the scalar values a sink writes, step by step.

    Per step: the total norm, the depth bands (log10) and the remedies' scales. At the newest step
    of a record: every layer's last norm, window max/min/median (and non-finite count when there is
    one), weight norm and update ratio, and the count of every alert kind seen so far. A new alert
    is also counted at its own step, after the previous count one step earlier (unless that step
    was already written), so a chart shows a step, not a ramp. Steps never go back to one already
    written (loggers such as W&B drop those). Keeps what carries over between records.

    Args:
        prefix: Root of every tag.
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self._alert_counts: dict[str, int] = {}
        self._peak = -math.inf
        self._last_step = -1  # newest step written so far
        self._early_alerts: list[Alert] = []  # of records without steps, counted with the next
        self._layer_tags: tuple[tuple[str, ...], dict[str, list[str]]] | None = None

    def layer_tags(self, names: list[str]) -> dict[str, list[str]]:
        """Tags of every layer family for these layers (cached for the last set of names)."""
        key = tuple(names)
        if self._layer_tags is None or self._layer_tags[0] != key:
            tags = {
                family: [layer_tag(family, name, self.prefix) for name in names]
                for family in LAYER_FAMILIES
            }
            self._layer_tags = (key, tags)
        return self._layer_tags[1]

    def scalars(self, record: FlushRecord) -> dict[int, dict[str, float]]:
        """``{step: {tag: value}}`` for one record, steps in increasing order."""
        steps = [int(step) for step in record.steps]
        if not steps:  # an early flush: its alerts are counted with the steps of the next record
            self._early_alerts += record.new_alerts
            return {}
        columns = [(f"{self.prefix}/grad_norm_total", np.asarray(record.total_norms))]
        if record.clip_coefs is not None:
            columns.append((f"{self.prefix}/clip_coef", record.clip_coefs))
        if record.lr_scales is not None:
            columns.append((f"{self.prefix}/lr_scale", record.lr_scales))
        columns += self._depth_columns(record)
        lists = [(tag, np.asarray(values, dtype=np.float64).tolist()) for tag, values in columns]
        out = {step: {tag: values[row] for tag, values in lists} for row, step in enumerate(steps)}
        out[steps[-1]].update(self._layer_values(record))
        alerts, self._early_alerts = [*self._early_alerts, *record.new_alerts], []
        for step, tag, count in self._alert_points(record, alerts):
            out.setdefault(step, {})[tag] = float(count)
        return dict(sorted(out.items()))

    def _depth_columns(self, record: FlushRecord) -> list[tuple[str, np.ndarray]]:
        norms = np.asarray(record.grad_norms, dtype=np.float64)
        columns = []
        for band, layers in depth_bands(norms.shape[1]):
            band_norm = np.sqrt(np.square(norms[:, layers]).sum(axis=1))
            columns.append((depth_tag(band, self.prefix), log10_or_nan(band_norm)))
        total = log10_or_nan(record.total_norms)
        peaks = np.fmax.accumulate(np.concatenate([[self._peak], total]))[1:]
        self._peak = float(peaks[-1])
        peaks = np.where(np.isfinite(peaks), peaks, np.nan)
        columns.append((depth_tag(ALL_LAYERS, self.prefix), total))
        columns.append((depth_tag(PEAK, self.prefix), peaks))
        return columns

    def _layer_values(self, record: FlushRecord) -> dict[str, float]:
        tags = self.layer_tags(record.layer_names)
        window = record.window()
        rows: list[tuple[str, np.ndarray]] = [
            (GRAD_NORM_FAMILY, record.grad_norms[-1]),
            (WEIGHT_NORM_FAMILY, record.weight_norms),
        ]
        if window is not None and window.steps > 1:  # one step: they equal the last value
            rows += [
                (WINDOW_MAX_FAMILY, window.max),
                (WINDOW_MIN_FAMILY, window.min),
                (WINDOW_MEDIAN_FAMILY, window.median),
            ]
        if record.update_ratios is not None:
            rows.append((UPDATE_RATIO_FAMILY, record.update_ratios))
        values: dict[str, float] = {}
        for family, row in rows:
            values.update(
                zip(tags[family], np.asarray(row, dtype=np.float64).tolist(), strict=True)
            )
        if window is not None:
            for index in np.flatnonzero(window.nonfinite):
                values[tags[NONFINITE_FAMILY][index]] = float(window.nonfinite[index])
        return values

    def _alert_points(self, record: FlushRecord, alerts: list[Alert]) -> list[tuple[int, str, int]]:
        """``(step, tag, count)`` of the alert counts: at the step of each new alert (after the
        previous count one step earlier), and at the newest step for every kind seen so far.
        ``alerts``: the new alerts of the record and of the early records before it."""
        first, last = int(record.steps[0]), int(record.steps[-1])
        earliest = max(first - 1, self._last_step, 0)  # never before what was already written
        self._last_step = last
        points: list[tuple[int, str, int]] = []
        for kind, count in sorted(record.alert_counts.items()):
            before = self._alert_counts.get(kind, 0)
            self._alert_counts[kind] = count
            tag = f"{self.prefix}/alerts/{kind}"
            new = sorted(a.step for a in alerts if a.kind.value == kind)
            new = [step for step in new if first <= step <= last][-max(count - before, 0) :]
            if len(new) == count - before:
                for offset, step in enumerate(new):
                    if step - 1 >= earliest and (step - 1, tag) not in {p[:2] for p in points}:
                        points.append((step - 1, tag, before + offset))
                    points.append((step, tag, before + offset + 1))
            if count and (not points or points[-1][:2] != (last, tag)):
                points.append((last, tag, count))
        return points


def format_alert_markdown(alert: Alert) -> str:
    """The ``gradwatch/alerts`` text of an alert (Markdown; ``gradwatch report`` parses it back)."""
    header = f"**{alert.kind.value}** ({alert.severity}) at step {alert.step}"
    if alert.layers:
        header += ", layers: " + ", ".join(f"`{display_name(name)}`" for name in alert.layers)
    text = f"{header}\n\n{alert.message}"
    if alert.advice:
        text += "\n\nAdvice:\n" + "\n".join(f"- {item}" for item in alert.advice)
    return text


def format_alert_log(alerts: list[Alert]) -> str:
    """The ``gradwatch/alert_log`` text: every alert so far, oldest first, one line each.

    TensorBoard's TEXT tab shows the newest step first, so the newest log (the complete one) is on
    top and reads from the first alert down. Beyond :data:`MAX_LOGGED_ALERTS` the middle is left
    out.
    """
    ordered = sorted(alerts, key=lambda alert: alert.step)
    head = MAX_LOGGED_ALERTS // 5
    shown: list[tuple[int, Alert] | None] = list(enumerate(ordered, start=1))
    if len(ordered) > MAX_LOGGED_ALERTS:
        tail = MAX_LOGGED_ALERTS - head
        shown = [*shown[:head], None, *shown[-tail:]]
    steps = "none yet"
    if ordered:
        first, last = ordered[0].step, ordered[-1].step
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
    lines = [f"**{len(ordered)} alert(s), oldest first** ({steps}; advice: `gradwatch/alerts`)", ""]
    for item in shown:
        if item is None:
            left_out = len(ordered) - MAX_LOGGED_ALERTS
            lines.append(f"- ... {left_out} alerts left out (`gradwatch report` lists them all)")
            continue
        number, alert = item
        where = ""
        if alert.layers:
            names = ", ".join(f"`{display_name(name)}`" for name in alert.layers[:4])
            more = f" (+{len(alert.layers) - 4} more)" if len(alert.layers) > 4 else ""
            where = f" in {names}{more}"
        lines.append(
            f"{number}. step {alert.step}: **{alert.kind.value}** ({alert.severity}){where}: "
            f"{alert.message}"
        )
    return "\n".join(lines)


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
