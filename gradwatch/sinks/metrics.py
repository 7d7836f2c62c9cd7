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
from gradwatch.sinks.schema import ScalarTags, format_alert_markdown

ALERTS_FILE = "gradwatch_alerts.md"
ALERT_SEPARATOR = "\n\n---\n\n"


def check_prefix(prefix: object) -> str:
    """``prefix`` without surrounding slashes; ValueError unless it is a non-empty string."""
    if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"prefix must be a non-empty tag root such as 'gradwatch', got {prefix!r}")
    return prefix.strip("/")


class LoggerMetricsSink(Sink):
    """Writes the scalars of every flush through ``logger.log_metrics(metrics, step)``.

    For each step of a flush it logs the total gradient norm, the log10 norms by depth (and the clip
    coefficient and learning-rate scale when a remedy produces them); at the newest step of the
    flush it adds the per-layer gradient norms with their window max/min/median, weight norms,
    update ratios (``track_updates=True``) and the alert counts
    (:class:`~gradwatch.sinks.schema.ScalarTags`). The tags are the TensorBoard sink's under
    ``prefix`` (``<prefix>/grad_norm_total``, ``<prefix>/grad_norm/<layer>``...); the root layer
    ``""`` is written ``<root>``.

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
        self._scalars = ScalarTags(self.prefix)

    def write(self, record: FlushRecord) -> None:
        """Logs one flush: one ``log_metrics`` call per step, the per-layer values at the newest."""
        for step, metrics in self._scalars.scalars(record).items():
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
