"""``LoggerMetricsSink``: gradwatch scalars through any logger's ``log_metrics(metrics, step)``.

Lightning's loggers (CSV, Neptune, Comet, TensorBoard...) all take scalars through
``log_metrics``; this sink is how gradwatch reaches the ones that have no sink of their own
(TensorBoard, W&B and MLflow do). It writes the same scalar tags as the TensorBoard sink, and the
alert text to a Markdown file in the logger's ``log_dir`` when it has one.
"""

from __future__ import annotations

import os
from typing import Any

from gradwatch.engine.records import FlushRecord
from gradwatch.sinks.base import Sink
from gradwatch.sinks.schema import format_alert_markdown, layer_tag

ALERTS_FILE = "gradwatch_alerts.md"
ALERT_SEPARATOR = "\n\n---\n\n"


def metric_rows(
    record: FlushRecord, prefix: str, alert_counts: dict[str, int]
) -> list[tuple[int, dict[str, float]]]:
    """The scalars of one flush as ``(step, {tag: value})`` rows, one per step, oldest first.

    Every row holds the total gradient norm (and the clip coefficient and learning-rate scale when
    a remedy produces them); the newest row adds the per-layer gradient norms, weight norms, update
    ratios and the alert counts that changed since the last call (``alert_counts`` is updated).

    Args:
        record: The flush.
        prefix: Root of every tag.
        alert_counts: The counts written so far, per kind (read and updated).
    """
    rows = []
    last = len(record.steps) - 1
    for row, step in enumerate(record.steps):
        metrics = {f"{prefix}/grad_norm_total": float(record.total_norms[row])}
        if record.clip_coefs is not None:
            metrics[f"{prefix}/clip_coef"] = float(record.clip_coefs[row])
        if record.lr_scales is not None:
            metrics[f"{prefix}/lr_scale"] = float(record.lr_scales[row])
        if row == last:
            families = [("grad_norm", record.grad_norms[-1]), ("weight_norm", record.weight_norms)]
            if record.update_ratios is not None:
                families.append(("update_ratio", record.update_ratios))
            for family, values in families:
                for name, value in zip(record.layer_names, values, strict=True):
                    metrics[layer_tag(family, name, prefix)] = float(value)
            for kind, count in record.alert_counts.items():
                if alert_counts.get(kind) != count:
                    metrics[f"{prefix}/alerts/{kind}"] = float(count)
                    alert_counts[kind] = count
        rows.append((int(step), metrics))
    return rows


def check_prefix(prefix: object) -> str:
    """``prefix`` without surrounding slashes; ValueError unless it is a non-empty string."""
    if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"prefix must be a non-empty tag root such as 'gradwatch', got {prefix!r}")
    return prefix.strip("/")


class LoggerMetricsSink(Sink):
    """Writes the scalars of every flush through ``logger.log_metrics(metrics, step)``.

    For each step of a flush it logs the total gradient norm (and the clip coefficient and
    learning-rate scale when a remedy produces them); at the newest step of the flush it adds the
    per-layer gradient norms, weight norms, update ratios (``track_updates=True``) and the alert
    counts that changed. Tags: ``<prefix>/grad_norm_total``, ``<prefix>/grad_norm/<layer>``,
    ``<prefix>/weight_norm/<layer>``, ``<prefix>/update_ratio/<layer>``, ``<prefix>/clip_coef``,
    ``<prefix>/lr_scale``, ``<prefix>/alerts/<kind>``; the root layer ``""`` is written ``<root>``.

    ``log_metrics`` takes numbers only, so the alert text (message and advice, the Markdown of
    TensorBoard's ``gradwatch/alerts``) is appended to ``<log_dir>/gradwatch_alerts.md`` when the
    logger has a ``log_dir`` (Lightning's CSV and TensorBoard loggers); a logger without one gets
    the counts only (the text is still in ``watch.alerts``, ``on_alert`` and the ``gradwatch``
    Python logger). Like every sink it only runs on rank 0.

    Example:
        >>> from lightning_fabric.loggers import CSVLogger  # doctest: +SKIP
        >>> watch = GradWatch(model, sinks=[LoggerMetricsSink(CSVLogger("logs"))])  # doctest: +SKIP

    Args:
        logger: Any object with ``log_metrics(metrics: dict[str, float], step: int)``.
        prefix: Root of every tag, e.g. ``"gradwatch/optimizer_1"`` for a second optimizer's watch.
    """

    def __init__(self, logger: Any, prefix: str = "gradwatch") -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(
                f"logger must have a log_metrics(metrics, step) method, got {type(logger).__name__}"
            )
        self.logger = logger
        self.prefix = check_prefix(prefix)
        self._alert_counts: dict[str, int] = {}

    def write(self, record: FlushRecord) -> None:
        """Logs one flush: one ``log_metrics`` call per step, the per-layer values at the newest."""
        for step, metrics in metric_rows(record, self.prefix, self._alert_counts):
            self.logger.log_metrics(metrics, step=step)
        path = self.alerts_path
        if record.new_alerts and path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            texts = [format_alert_markdown(alert) for alert in record.new_alerts]
            with open(path, "a", encoding="utf-8") as file:
                if file.tell():
                    file.write(ALERT_SEPARATOR)
                file.write(ALERT_SEPARATOR.join(texts) + "\n")

    @property
    def alerts_path(self) -> str | None:
        """Where the alert text goes: ``<log_dir>/gradwatch_alerts.md`` (None: no ``log_dir``)."""
        log_dir = getattr(self.logger, "log_dir", None)
        if not isinstance(log_dir, str | os.PathLike):
            return None
        name = ALERTS_FILE
        if self.prefix != "gradwatch":  # one file per watch, e.g. gradwatch_optimizer_1_alerts.md
            name = self.prefix.replace("/", "_") + "_alerts.md"
        return os.path.join(os.fspath(log_dir), name)
