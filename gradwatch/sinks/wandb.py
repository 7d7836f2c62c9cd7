"""``WandbSink``: every gradwatch step and every alert into a Weights & Biases run.

A W&B run only appends history rows: ``run.log(metrics, step=s)`` with ``s`` below the run's
current step is dropped ("Tried to log to step ... that is less than the current step"), and
gradwatch writes the steps of a flush after they happened, while the training code may already
have logged later steps. So this sink never passes ``step=``: each gradwatch step becomes its own
row carrying its number in the step metric ``<prefix>/step``, and every gradwatch key is declared
by name with ``run.define_metric(key, step_metric="<prefix>/step")``, so W&B plots it against that
metric (a name wins over a catch-all such as ``define_metric("*", step_metric=...)`` of the
Lightning and Hugging Face loggers). Nothing is dropped, whatever else logs to the run.

``wandb`` is imported when a sink is built, not by ``import gradwatch``.
"""

from __future__ import annotations

import warnings
from typing import Any

from gradwatch.engine.alerts import Alert
from gradwatch.engine.records import FlushRecord
from gradwatch.engine.text import display_name
from gradwatch.sinks.base import Sink
from gradwatch.sinks.metrics import ALERT_SEPARATOR, check_prefix
from gradwatch.sinks.schema import ScalarTags, format_alert_markdown

_LEVELS = {"info": "INFO", "warning": "WARN", "error": "ERROR"}
ALERT_COLUMNS = ["step", "kind", "severity", "layers", "message", "advice"]


def import_wandb() -> Any:
    """The ``wandb`` module, or an ImportError that says how to install it."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            "WandbSink needs wandb: pip install 'gradwatch[wandb]' (or: pip install wandb)"
        ) from error
    return wandb


class WandbSink(Sink):
    """Writes every flush to a W&B run: one history row per gradwatch step, alerts included.

    Rows: ``<prefix>/grad_norm_total`` (and ``clip_coef``, ``lr_scale`` with a remedy) at every
    step; the per-layer ``<prefix>/grad_norm/<layer>``, ``weight_norm``, ``update_ratio`` and the
    changed ``<prefix>/alerts/<kind>`` counts at the newest step of each flush (the tags of the
    TensorBoard sink; root layer ``<root>``). Each row also holds ``<prefix>/step``.

    Alerts: their Markdown text (message and advice) in ``<prefix>/alert_text`` at the step where
    they were detected, one row per alert in the table ``<prefix>/alert_table`` (step, kind,
    severity, layers, message, advice; an ``INCREMENTAL`` table: W&B server 0.70 or newer), and
    ``run.alert`` for warnings and errors (email/Slack notifications online; best effort: a
    failure turns them off with one warning; ``send_alerts=False`` to turn them off).

    Example:
        >>> run = wandb.init(project="my-project")  # doctest: +SKIP
        >>> watch = gw.GradWatch(model, optimizer, sinks=[WandbSink(run)])  # doctest: +SKIP

    Args:
        run: A ``wandb`` run; None: ``wandb.run`` at the first write (so the sink can be built
            before ``wandb.init``).
        prefix: Root of every key, e.g. ``"gradwatch/optimizer_1"`` for a second optimizer's watch.
        send_alerts: Also call ``run.alert`` for warning and error alerts.

    Raises:
        ImportError: ``wandb`` is not installed.
    """

    def __init__(self, run: Any = None, prefix: str = "gradwatch", *, send_alerts: bool = True):
        self._wandb = import_wandb()
        if run is not None and not callable(getattr(run, "log", None)):
            raise TypeError(f"run must be a wandb run (with .log), got {type(run).__name__}")
        if not isinstance(send_alerts, bool):
            raise TypeError(f"send_alerts must be a bool, got {send_alerts!r}")
        self.run = run
        self.prefix = check_prefix(prefix)
        self.send_alerts = send_alerts
        self._defined: set[str] = set()
        self._scalars = ScalarTags(self.prefix)
        self._table: Any = None

    def write(self, record: FlushRecord) -> None:
        """Appends one row per step of the flush, then the new alerts."""
        run = self._resolve_run()
        step_key = f"{self.prefix}/step"
        text_key = f"{self.prefix}/alert_text"
        alerts_by_step: dict[int, list[Alert]] = {}
        for alert in record.new_alerts:
            alerts_by_step.setdefault(alert.step, []).append(alert)
        rows = list(self._scalars.scalars(record).items())
        rows += [(step, {}) for step in alerts_by_step if step not in {s for s, _ in rows}]
        for step, metrics in sorted(rows, key=lambda row: row[0]):
            alerts = alerts_by_step.get(step, [])
            values: dict[str, Any] = dict(metrics)
            if alerts:  # several alerts of one step share its row
                values[text_key] = ALERT_SEPARATOR.join(map(format_alert_markdown, alerts))
            self._define(run, [*values])
            values[step_key] = step
            run.log(values)  # no step=: appended as the next row, never dropped
        if record.new_alerts:
            self._log_alerts(run, record)

    def _resolve_run(self) -> Any:
        if self.run is None:
            if self._wandb.run is None:
                raise RuntimeError("WandbSink: no W&B run; call wandb.init() or pass run=")
            self.run = self._wandb.run
        return self.run

    def _define(self, run: Any, keys: list[str]) -> None:
        """Declares ``keys`` (once each) as plotted against ``<prefix>/step``."""
        step_key = f"{self.prefix}/step"
        if step_key not in self._defined:
            run.define_metric(step_key, hidden=True)
            self._defined.add(step_key)
        for key in keys:
            if key not in self._defined:
                run.define_metric(key, step_metric=step_key)
                self._defined.add(key)

    def _notify(self, run: Any, alert: Alert) -> None:
        """``run.alert``; a failure (rate limit, no permission...) turns notifications off."""
        try:
            run.alert(
                title=f"gradwatch: {alert.kind.value}",
                text=str(alert),
                level=_LEVELS[alert.severity],
            )
        except Exception as error:
            self.send_alerts = False
            warnings.warn(
                f"gradwatch: W&B run.alert failed ({error!r}); notifications are off, the alerts "
                "are still logged to the run",
                RuntimeWarning,
                stacklevel=2,
            )

    def _log_alerts(self, run: Any, record: FlushRecord) -> None:
        if self._table is None:
            self._table = self._wandb.Table(columns=ALERT_COLUMNS, log_mode="INCREMENTAL")
        for alert in record.new_alerts:
            layers = ", ".join(display_name(name) for name in alert.layers)
            advice = "\n".join(alert.advice)
            self._table.add_data(
                alert.step, alert.kind.value, alert.severity, layers, alert.message, advice
            )
            if self.send_alerts and alert.severity in ("warning", "error"):
                self._notify(run, alert)
        table_key = f"{self.prefix}/alert_table"
        self._define(run, [table_key])
        run.log({table_key: self._table, f"{self.prefix}/step": record.last_step})
