"""``MlflowSink``: every gradwatch step and every alert into an MLflow run.

MLflow keeps every ``(metric, step)`` it is given, in any order, so the steps of a flush go in
with one ``MlflowClient.log_batch`` call (per 1000 metrics, MLflow's batch limit). Metric names
may only hold letters, digits and ``_ - . / : space``: other characters become ``_`` (the root
layer ``<root>`` is written ``_root_``). The alert text, which a metric cannot hold, goes into
Markdown artifacts and run tags.

``mlflow`` (or ``mlflow-skinny``) is imported when a sink is built, not by ``import gradwatch``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from gradwatch.engine.records import FlushRecord
from gradwatch.sinks.base import Sink
from gradwatch.sinks.metrics import ALERT_SEPARATOR, check_prefix
from gradwatch.sinks.schema import ScalarTags, format_alert_markdown

BATCH_LIMIT = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
_NOT_ALLOWED = re.compile(r"[^/\w.\- :]")


def import_mlflow() -> Any:
    """The ``mlflow`` module, or an ImportError that says how to install it."""
    try:
        import mlflow
    except ImportError as error:
        raise ImportError(
            "MlflowSink needs MLflow: pip install 'gradwatch[mlflow]' (or pip install mlflow)"
        ) from error
    return mlflow


def mlflow_key(tag: str) -> str:
    """A valid MLflow metric or artifact name for a gradwatch tag (bad characters become ``_``)."""
    return "/".join(_NOT_ALLOWED.sub("_", part) for part in tag.split("/") if part)


class MlflowSink(Sink):
    """Writes every flush to an MLflow run: every step's scalars, the alert text as artifacts.

    Metrics (the tags of the TensorBoard sink): ``<prefix>/grad_norm_total`` (and ``clip_coef``,
    ``lr_scale`` with a remedy) at every step; ``<prefix>/grad_norm/<layer>``, ``weight_norm``,
    ``update_ratio`` and the changed ``<prefix>/alerts/<kind>`` counts at the newest step of each
    flush. Alerts: one artifact ``<prefix>/alerts/step_<step>_<kind>.md`` each (message and
    advice, the Markdown of TensorBoard's ``gradwatch/alerts``), the artifact ``<prefix>/alerts.md``
    with every alert so far, the tags ``<prefix>.alerts.<kind>`` (counts) and
    ``<prefix>.last_alert``.

    Example:
        >>> with mlflow.start_run():  # doctest: +SKIP
        ...     watch = gw.GradWatch(model, optimizer, sinks=[MlflowSink()])

    Args:
        run_id: The run to write to; None: the active run (``mlflow.active_run()``) at the first
            write.
        client: An ``mlflow.MlflowClient``; None: one for the current tracking URI.
        prefix: Root of every metric, artifact and tag name.

    Raises:
        ImportError: ``mlflow`` is not installed.
    """

    def __init__(
        self, run_id: str | None = None, client: Any = None, prefix: str = "gradwatch"
    ) -> None:
        self._mlflow = import_mlflow()
        if run_id is not None and not isinstance(run_id, str):
            raise TypeError(f"run_id must be an MLflow run id (str) or None, got {run_id!r}")
        if client is not None and not callable(getattr(client, "log_batch", None)):
            raise TypeError(f"client must be an mlflow.MlflowClient, got {type(client).__name__}")
        self.run_id = run_id
        self.client = client
        self.prefix = mlflow_key(check_prefix(prefix))
        self._scalars = ScalarTags(self.prefix)
        self._alert_texts: list[str] = []

    def write(self, record: FlushRecord) -> None:
        """Logs the flush's metrics in batches, then its new alerts."""
        client, run_id = self._resolve()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(mlflow_key(tag), value, now, step)
            for step, row in self._scalars.scalars(record).items()
            for tag, value in row.items()
        ]
        for start in range(0, len(metrics), BATCH_LIMIT):
            client.log_batch(run_id, metrics=metrics[start : start + BATCH_LIMIT])
        if record.new_alerts:
            self._write_alerts(client, run_id, record)

    def _resolve(self) -> tuple[Any, str]:
        if self.client is None:
            self.client = self._mlflow.MlflowClient()
        if self.run_id is None:
            run = self._mlflow.active_run()
            if run is None:
                raise RuntimeError("MlflowSink: no active MLflow run; start one or pass run_id=")
            self.run_id = run.info.run_id
        return self.client, self.run_id

    def _write_alerts(self, client: Any, run_id: str, record: FlushRecord) -> None:
        from mlflow.entities import RunTag

        for alert in sorted(record.new_alerts, key=lambda alert: alert.step):
            text = format_alert_markdown(alert)
            self._alert_texts.append(text)
            name = f"{self.prefix}/alerts/step_{alert.step:08d}_{alert.kind.value}.md"
            client.log_text(run_id, text, name)
        client.log_text(
            run_id, ALERT_SEPARATOR.join(self._alert_texts) + "\n", f"{self.prefix}/alerts.md"
        )
        prefix = self.prefix.replace("/", ".")
        tags = [
            RunTag(f"{prefix}.alerts.{kind}", str(count))
            for kind, count in record.alert_counts.items()
        ]
        tags.append(RunTag(f"{prefix}.last_alert", str(record.new_alerts[-1])[:5000]))
        client.log_batch(run_id, tags=tags)
