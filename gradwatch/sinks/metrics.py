"""``LoggerMetricsSink``: gradwatch scalars through any logger's ``log_metrics(metrics, step)``.

Lightning's loggers (CSV, Weights & Biases, MLflow, Neptune, Comet, TensorBoard...) all take scalars
through ``log_metrics``; this sink is how gradwatch reaches the ones that are not a TensorBoard
``SummaryWriter``. It writes the same scalar tags as the TensorBoard sink.
"""

from __future__ import annotations

from typing import Any

from gradwatch.engine.records import FlushRecord
from gradwatch.sinks.base import Sink
from gradwatch.sinks.schema import layer_tag


class LoggerMetricsSink(Sink):
    """Writes the scalars of every flush through ``logger.log_metrics(metrics, step)``.

    For each step of a flush it logs the total gradient norm (and the clip coefficient and
    learning-rate scale when a remedy produces them); at the newest step of the flush it adds the
    per-layer gradient norms, weight norms, update ratios (``track_updates=True``) and the alert
    counts that changed. Tags: ``<prefix>/grad_norm_total``, ``<prefix>/grad_norm/<layer>``,
    ``<prefix>/weight_norm/<layer>``, ``<prefix>/update_ratio/<layer>``, ``<prefix>/clip_coef``,
    ``<prefix>/lr_scale``, ``<prefix>/alerts/<kind>``; the root layer ``""`` is written ``<root>``.
    Like every sink it only runs on rank 0.

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
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(
                f"prefix must be a non-empty tag root such as 'gradwatch', got {prefix!r}"
            )
        self.logger = logger
        self.prefix = prefix.strip("/")
        self._alert_counts: dict[str, int] = {}

    def write(self, record: FlushRecord) -> None:
        """Logs one flush: one ``log_metrics`` call per step, the per-layer values at the newest."""
        last = len(record.steps) - 1
        for row, step in enumerate(record.steps):
            metrics = {self._tag("grad_norm_total"): float(record.total_norms[row])}
            if record.clip_coefs is not None:
                metrics[self._tag("clip_coef")] = float(record.clip_coefs[row])
            if record.lr_scales is not None:
                metrics[self._tag("lr_scale")] = float(record.lr_scales[row])
            if row == last:
                metrics.update(self._newest_step_metrics(record))
            self.logger.log_metrics(metrics, step=int(step))

    def _newest_step_metrics(self, record: FlushRecord) -> dict[str, float]:
        metrics: dict[str, float] = {}
        families = [("grad_norm", record.grad_norms[-1]), ("weight_norm", record.weight_norms)]
        if record.update_ratios is not None:
            families.append(("update_ratio", record.update_ratios))
        for family, values in families:
            for name, value in zip(record.layer_names, values, strict=True):
                metrics[layer_tag(family, name, self.prefix)] = float(value)
        for kind, count in record.alert_counts.items():
            if self._alert_counts.get(kind) != count:
                metrics[self._tag("alerts", kind)] = float(count)
                self._alert_counts[kind] = count
        return metrics

    def _tag(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))
