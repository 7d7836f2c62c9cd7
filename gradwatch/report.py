"""``gradwatch report``: the diagnosis of a finished run, read back from its event files.

The event files are read with TensorBoard's own ``EventAccumulator``. A log directory may hold
several runs (one sub-directory each, as ``gradwatch demo`` writes them); every run with gradwatch
data gets a per-layer table of gradient norms and its alerts with their steps and advice, taken
from the ``gradwatch/alerts`` text. The smallest, median and largest norm of a layer cover every
step, not only the log steps: they come from the window summaries written at each flush
(``gradwatch/grad_norm_max/<layer>``...), so a spike or a NaN between two log steps is not lost.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.engine.text import fmt, format_layers
from gradwatch.sinks.schema import (
    ALERTS_TAG,
    GRAD_NORM_FAMILY,
    NONFINITE_FAMILY,
    PREFIX,
    TOTAL_TAG,
    WINDOW_MAX_FAMILY,
    WINDOW_MEDIAN_FAMILY,
    WINDOW_MIN_FAMILY,
    ReportedAlert,
    parse_alert_markdown,
)

SEVERITIES = ("info", "warning", "error")
_ALERT_COUNT_PREFIX = f"{ALERTS_TAG}/"
_TEXT_TAGS = (ALERTS_TAG, f"{ALERTS_TAG}/text_summary")  # the second: SummaryWriter.add_text
_FAMILIES = (
    GRAD_NORM_FAMILY,
    WINDOW_MAX_FAMILY,
    WINDOW_MIN_FAMILY,
    WINDOW_MEDIAN_FAMILY,
    NONFINITE_FAMILY,
)
_KIND_SEVERITY = {"nonfinite": "error", "amp_overflow": "info"}  # when only counts were written
_MAX_NAME = 40


class ReportError(Exception):
    """A log directory that cannot be reported on (missing, empty, no gradwatch data)."""


@dataclass
class LayerRow:
    """One layer's gradient norms over the run.

    Attributes:
        name: Layer name (``<root>`` for the root module).
        first: Norm at the first log step.
        last: Norm at the last log step.
        low: Smallest finite norm of any step (NaN when none is finite).
        median: Median norm (the median of the windows' medians; NaN when none is finite).
        high: Largest finite norm of any step (NaN when none is finite).
        nonfinite: Steps whose norm was NaN or Inf.
        points: Number of log steps.
    """

    name: str
    first: float
    last: float
    low: float
    median: float
    high: float
    nonfinite: int
    points: int


@dataclass
class RunReport:
    """What one run's event files say.

    Attributes:
        name: Run directory relative to the log directory (``.`` for the directory itself).
        path: Run directory.
        first_step: First step with a total norm (-1 when none).
        last_step: Last step with a total norm (-1 when none).
        steps: Number of total-norm points.
        total_peak: Largest finite total gradient norm (NaN when none).
        total_peak_step: Its step (-1 when none).
        total_last: Total gradient norm at the last step.
        total_nonfinite: Steps whose total norm was NaN or Inf.
        layers: Per-layer rows in forward order.
        alerts: Alerts in step order.
        alert_counts: Alerts so far per kind, at the end of the run.
    """

    name: str
    path: Path
    first_step: int = -1
    last_step: int = -1
    steps: int = 0
    total_peak: float = math.nan
    total_peak_step: int = -1
    total_last: float = math.nan
    total_nonfinite: int = 0
    layers: list[LayerRow] = field(default_factory=list)
    alerts: list[ReportedAlert] = field(default_factory=list)
    alert_counts: dict[str, int] = field(default_factory=dict)

    @property
    def worst_severity(self) -> str | None:
        """``"error"``, ``"warning"`` or ``"info"``: the worst alert of the run (None: none)."""
        found = {alert.severity for alert in self.alerts}
        if not self.alerts:  # a writer without text support: the counts tell the kinds
            found = {
                _KIND_SEVERITY.get(kind, "warning") for kind, n in self.alert_counts.items() if n
            }
        ranked = [severity for severity in SEVERITIES if severity in found]
        return ranked[-1] if ranked else None


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Directories under ``logdir`` (itself included) that contain TensorBoard event files."""
    root = Path(logdir)
    runs = {path.parent for path in root.rglob("events.out.tfevents.*") if path.is_file()}
    return sorted(runs)


def load_run(run_dir: Path, name: str) -> RunReport | None:
    """Reads one run's event files; None when they hold no gradwatch data."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = ea.EventAccumulator(
        str(run_dir),
        size_guidance={
            ea.SCALARS: 0,
            ea.TENSORS: 0,
            ea.IMAGES: 1,
            ea.HISTOGRAMS: 1,
            ea.COMPRESSED_HISTOGRAMS: 1,
        },
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    scalar_tags: list[str] = tags.get(ea.SCALARS, [])
    tensor_tags: list[str] = tags.get(ea.TENSORS, [])
    if not any(tag.startswith(f"{PREFIX}/") for tag in scalar_tags):
        return None
    report = RunReport(name=name, path=run_dir)
    if TOTAL_TAG in scalar_tags:
        _read_totals(report, [(e.step, e.value) for e in accumulator.Scalars(TOTAL_TAG)])
    series: dict[str, dict[str, list[float]]] = {family: {} for family in _FAMILIES}
    for tag in scalar_tags:
        family, _, layer = tag[len(PREFIX) + 1 :].partition("/")
        if tag.startswith(f"{PREFIX}/") and family in series and layer:
            series[family][layer] = [event.value for event in accumulator.Scalars(tag)]
        elif tag.startswith(_ALERT_COUNT_PREFIX):
            events = accumulator.Scalars(tag)
            report.alert_counts[tag[len(_ALERT_COUNT_PREFIX) :]] = int(events[-1].value)
    report.layers = [
        _layer_row(layer, *(series[family].get(layer, []) for family in _FAMILIES))
        for layer in series[GRAD_NORM_FAMILY]
    ]
    for tag in _TEXT_TAGS:
        if tag in tensor_tags:
            for event in accumulator.Tensors(tag):
                for raw in event.tensor_proto.string_val:
                    alert = parse_alert_markdown(raw.decode("utf-8", errors="replace"))
                    if alert is not None:
                        report.alerts.append(alert)
    report.alerts.sort(key=lambda alert: alert.step)
    return report


def load_reports(logdir: str | os.PathLike[str]) -> list[RunReport]:
    """Every gradwatch run under ``logdir``.

    Raises:
        ReportError: ``logdir`` is missing, holds no event files, or no gradwatch data.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise ReportError(f"no such directory: {os.fspath(logdir)}")
    run_dirs = find_runs(root)
    if not run_dirs:
        raise ReportError(f"no TensorBoard event files under {os.fspath(logdir)}")
    reports = []
    for run_dir in run_dirs:
        report = load_run(run_dir, run_dir.relative_to(root).as_posix())
        if report is not None:
            reports.append(report)
    if not reports:
        raise ReportError(f"no gradwatch data in the TensorBoard runs under {os.fspath(logdir)}")
    return reports


def build_report(logdir: str | os.PathLike[str]) -> str:
    """The diagnosis of every gradwatch run under ``logdir``, as text.

    Raises:
        ReportError: ``logdir`` is missing, holds no event files, or no gradwatch data.
    """
    return "\n\n".join(format_run(report) for report in load_reports(logdir))


def worst_severity(reports: Iterable[RunReport]) -> str | None:
    """The worst alert severity over the runs (None when no run has an alert)."""
    found = {report.worst_severity for report in reports}
    ranked = [severity for severity in SEVERITIES if severity in found]
    return ranked[-1] if ranked else None


def format_run(report: RunReport) -> str:
    """One run's diagnosis: header, per-layer table, alerts with steps and advice."""
    lines = [f"run {report.name} ({report.path})"]
    if report.steps:
        lines.append(
            f"steps {report.first_step}-{report.last_step} ({report.steps} recorded), "
            f"{len(report.layers)} layers in forward order"
        )
        peak = (
            f"peak {fmt(report.total_peak)} at step {report.total_peak_step}"
            if report.total_peak_step >= 0
            else "no finite value"
        )
        nonfinite = (
            f", NaN/Inf at {report.total_nonfinite} step(s)" if report.total_nonfinite else ""
        )
        lines.append(f"total gradient norm: {peak}, last {fmt(report.total_last)}{nonfinite}")
    if report.layers:
        lines += _layer_table(report.layers)
    if report.alerts:
        lines.append(f"alerts ({len(report.alerts)}):")
        for alert in report.alerts:
            where = f" in {format_layers(alert.layers)}" if alert.layers else ""
            lines.append(f"  step {alert.step}: {alert.kind.upper()} ({alert.severity}){where}")
            lines.append(f"    {alert.message}")
            for item in alert.advice:
                lines.append(f"    - {item}")
    elif report.alert_counts:
        counts = ", ".join(f"{kind} {count}" for kind, count in sorted(report.alert_counts.items()))
        lines.append(f"alerts: {counts}")
    else:
        lines.append("no alerts")
    return "\n".join(lines)


def report_json(reports: list[RunReport]) -> dict[str, Any]:
    """The runs as plain JSON values (NaN and Inf become ``null``)."""
    runs = []
    for report in reports:
        runs.append(
            {
                "name": report.name,
                "path": str(report.path),
                "first_step": report.first_step,
                "last_step": report.last_step,
                "steps": report.steps,
                "total_norm": {
                    "peak": _number(report.total_peak),
                    "peak_step": report.total_peak_step,
                    "last": _number(report.total_last),
                    "nonfinite_steps": report.total_nonfinite,
                },
                "layers": [
                    {
                        "name": row.name,
                        "first": _number(row.first),
                        "last": _number(row.last),
                        "min": _number(row.low),
                        "median": _number(row.median),
                        "max": _number(row.high),
                        "nonfinite_steps": row.nonfinite,
                        "log_points": row.points,
                    }
                    for row in report.layers
                ],
                "alerts": [vars(alert) for alert in report.alerts],
                "alert_counts": report.alert_counts,
                "worst_severity": report.worst_severity,
            }
        )
    return {"runs": runs, "worst_severity": worst_severity(reports)}


def _layer_table(rows: list[LayerRow]) -> list[str]:
    width = min(max(len("layer"), *(len(row.name) for row in rows)), _MAX_NAME)
    show_nonfinite = any(row.nonfinite for row in rows)
    header = "  ".join(f"{title:>10}" for title in ("first", "last", "min", "median", "max"))
    lines = [
        "gradient L2 norm per layer (first/last: at log steps; min/median/max: over every step):",
        f"  {'layer':<{width}}  {header}" + ("  NaN/Inf steps" if show_nonfinite else ""),
    ]
    for row in rows:
        name = row.name if len(row.name) <= width else row.name[: width - 1] + "…"
        values = (row.first, row.last, row.low, row.median, row.high)
        line = f"  {name:<{width}}  " + "  ".join(f"{fmt(value):>10}" for value in values)
        lines.append(line + (f"  {row.nonfinite:>14}" if show_nonfinite else ""))
    first, last = rows[0], rows[-1]
    if len(rows) > 1 and last.last > 0:
        ratio = first.last / last.last
        lines.append(
            f"  first/last layer ratio at the end: {fmt(ratio)} ({first.name} vs {last.name})"
        )
    return lines


def _read_totals(report: RunReport, points: list[tuple[int, float]]) -> None:
    steps = [step for step, _ in points]
    report.first_step, report.last_step, report.steps = min(steps), max(steps), len(steps)
    report.total_last = max(points)[1]
    finite = [(value, step) for step, value in points if math.isfinite(value)]
    report.total_nonfinite = len(points) - len(finite)
    if finite:
        value, step = max(finite, key=lambda item: item[0])
        report.total_peak, report.total_peak_step = value, step


def _layer_row(
    name: str,
    last_values: list[float],
    maxima: list[float],
    minima: list[float],
    medians: list[float],
    nonfinite: list[float],
) -> LayerRow:
    finite = [value for value in last_values if math.isfinite(value)]
    high = [value for value in maxima + finite if math.isfinite(value)]
    low = [value for value in minima + finite if math.isfinite(value)]
    middle = [value for value in (medians or finite) if math.isfinite(value)]
    return LayerRow(
        name=name,
        first=last_values[0] if last_values else math.nan,
        last=last_values[-1] if last_values else math.nan,
        low=min(low) if low else math.nan,
        median=statistics.median(middle) if middle else math.nan,
        high=max(high) if high else math.nan,
        nonfinite=int(sum(nonfinite)) if nonfinite else len(last_values) - len(finite),
        points=len(last_values),
    )


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None
