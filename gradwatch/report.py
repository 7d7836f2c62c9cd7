"""``gradwatch report``: the diagnosis of a finished run, read back from its event files.

The event files are read with TensorBoard's own ``EventAccumulator``. A log directory may hold
several runs (one sub-directory each, as ``gradwatch demo`` writes them); every run with gradwatch
data gets a per-layer table of gradient norms (first, last, min, max) and its alerts with their
steps and advice, taken from the ``gradwatch/alerts`` text.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gradwatch.engine.text import display_name, fmt, format_layers
from gradwatch.sinks.schema import (
    ALERTS_TAG,
    GRAD_NORM_FAMILY,
    PREFIX,
    TOTAL_TAG,
    ReportedAlert,
    parse_alert_markdown,
)

_GRAD_NORM_PREFIX = f"{PREFIX}/{GRAD_NORM_FAMILY}/"
_ALERT_COUNT_PREFIX = f"{ALERTS_TAG}/"
_TEXT_TAGS = (ALERTS_TAG, f"{ALERTS_TAG}/text_summary")  # the second: SummaryWriter.add_text
_MAX_NAME = 40


class ReportError(Exception):
    """A log directory that cannot be reported on (missing, empty, no gradwatch data)."""


@dataclass
class LayerRow:
    """One layer's gradient norm series, summarised.

    Attributes:
        name: Layer name (``<root>`` for the root module).
        first: Norm at the first logged step.
        last: Norm at the last logged step.
        low: Smallest finite norm (NaN when none is finite).
        high: Largest finite norm (NaN when none is finite).
        points: Number of logged values.
    """

    name: str
    first: float
    last: float
    low: float
    high: float
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
        layers: Per-layer rows in forward order.
        alerts: Alerts in step order.
        alert_counts: Alerts so far per kind, at the end of the run.
    """

    name: str
    path: Path
    first_step: int = -1
    last_step: int = -1
    steps: int = 0
    layers: list[LayerRow] = field(default_factory=list)
    alerts: list[ReportedAlert] = field(default_factory=list)
    alert_counts: dict[str, int] = field(default_factory=dict)


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
        steps = [event.step for event in accumulator.Scalars(TOTAL_TAG)]
        report.first_step, report.last_step, report.steps = min(steps), max(steps), len(steps)
    for tag in scalar_tags:
        if tag.startswith(_GRAD_NORM_PREFIX):
            values = [event.value for event in accumulator.Scalars(tag)]
            report.layers.append(_layer_row(tag[len(_GRAD_NORM_PREFIX) :], values))
        elif tag.startswith(_ALERT_COUNT_PREFIX):
            events = accumulator.Scalars(tag)
            report.alert_counts[tag[len(_ALERT_COUNT_PREFIX) :]] = int(events[-1].value)
    for tag in _TEXT_TAGS:
        if tag in tensor_tags:
            for event in accumulator.Tensors(tag):
                for raw in event.tensor_proto.string_val:
                    alert = parse_alert_markdown(raw.decode("utf-8", errors="replace"))
                    if alert is not None:
                        report.alerts.append(alert)
    report.alerts.sort(key=lambda alert: alert.step)
    return report


def build_report(logdir: str | os.PathLike[str]) -> str:
    """The diagnosis of every gradwatch run under ``logdir``, as text.

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
        name = run_dir.relative_to(root).as_posix()
        report = load_run(run_dir, name)
        if report is not None:
            reports.append(report)
    if not reports:
        raise ReportError(f"no gradwatch data in the TensorBoard runs under {os.fspath(logdir)}")
    return "\n\n".join(format_run(report) for report in reports)


def format_run(report: RunReport) -> str:
    """One run's diagnosis: header, per-layer table, alerts with steps and advice."""
    lines = [f"run {report.name} ({report.path})"]
    if report.steps:
        lines.append(
            f"steps {report.first_step}-{report.last_step} ({report.steps} recorded), "
            f"{len(report.layers)} layers in forward order"
        )
    if report.layers:
        width = min(max(len("layer"), *(len(row.name) for row in report.layers)), _MAX_NAME)
        lines.append("gradient L2 norm per layer:")
        lines.append(f"  {'layer':<{width}}  {'first':>10}  {'last':>10}  {'min':>10}  {'max':>10}")
        for row in report.layers:
            name = row.name if len(row.name) <= width else row.name[: width - 1] + "…"
            lines.append(
                f"  {name:<{width}}  {fmt(row.first):>10}  {fmt(row.last):>10}  "
                f"{fmt(row.low):>10}  {fmt(row.high):>10}"
            )
        first, last = report.layers[0], report.layers[-1]
        if len(report.layers) > 1 and last.last > 0:
            ratio = first.last / last.last
            lines.append(
                f"  first/last layer ratio at the end: {fmt(ratio)} ({first.name} vs {last.name})"
            )
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


def _layer_row(name: str, values: list[float]) -> LayerRow:
    finite = [value for value in values if math.isfinite(value)]
    return LayerRow(
        name=display_name(name),
        first=values[0] if values else math.nan,
        last=values[-1] if values else math.nan,
        low=min(finite) if finite else math.nan,
        high=max(finite) if finite else math.nan,
        points=len(values),
    )
