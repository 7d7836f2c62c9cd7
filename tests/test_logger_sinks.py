"""W&B, MLflow and log_metrics sinks in a plain loop: every step and every alert text arrives."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.alerts import AlertKind
from tests import wandb_reader

STEPS, SPIKE_AT, CADENCE = 30, 22, 10


def _plain_loop(
    sinks: list[gw.Sink], model: nn.Module | None = None, on_step: Any = None
) -> gw.GradWatch:
    """30 SGD steps with one gradient spike at step 22, flushed every 10 steps."""
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=CADENCE, sinks=sinks)
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean() * (1e4 if step == SPIKE_AT else 1.0)
        loss.backward()
        watch.step(loss)
        optimizer.step()
        if on_step is not None:
            on_step(step, loss)
    watch.close()
    return watch


def _totals(watch: gw.GradWatch) -> np.ndarray:
    history = watch.history()
    return np.sqrt(sum(history[name].astype(np.float64) ** 2 for name in watch.layer_names))


# ---------------------------------------------------------------------- W&B


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    wandb = pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)  # wandb may write debug files under the working directory
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return wandb


def test_wandb_sink_keeps_every_step_while_the_run_logs_other_rows(
    wandb_env: Any, tmp_path: Path
) -> None:
    run = wandb_env.init(project="gradwatch-test", dir=tmp_path, mode="offline")
    # the training code logs its own row at every step, so W&B's step runs ahead of the batched
    # gradwatch steps (an adapter passing step= loses all but the newest step of each flush)
    watch = _plain_loop([gw.WandbSink(run)], on_step=lambda step, loss: run.log({"loss": 1.0}))
    path = wandb_reader.run_file(run)
    run.finish()

    rows = wandb_reader.history(path)
    ours = [r for r in rows if "gradwatch/grad_norm_total" in r]
    assert [r["gradwatch/step"] for r in ours] == list(range(STEPS))
    assert [r["gradwatch/grad_norm_total"] for r in ours] == pytest.approx(_totals(watch), 1e-5)
    layer_rows = [r["gradwatch/step"] for r in rows if "gradwatch/grad_norm/0" in r]
    assert layer_rows == [9, 19, 29]
    assert sum("loss" in r for r in rows) == STEPS
    definitions = {m.name: m for m in wandb_reader.of_type(path, "metric") if m.name}
    assert definitions["gradwatch/grad_norm_total"].step_metric == "gradwatch/step"
    assert definitions["gradwatch/weight_norm/2"].step_metric == "gradwatch/step"


def test_wandb_sink_writes_the_alert_text_table_and_notifications(
    wandb_env: Any, tmp_path: Path
) -> None:
    run = wandb_env.init(project="gradwatch-test", dir=tmp_path, mode="offline")
    watch = _plain_loop([gw.WandbSink(run)])
    path = wandb_reader.run_file(run)
    run.finish()

    assert {a.kind for a in watch.alerts} >= {AlertKind.SPIKE}
    texts = {
        r["gradwatch/step"]: r["gradwatch/alert_text"]
        for r in wandb_reader.history(path)
        if "gradwatch/alert_text" in r
    }
    assert set(texts) == {a.step for a in watch.alerts}
    for alert in watch.alerts:
        assert alert.message in texts[alert.step]
        assert f"**{alert.kind.value}**" in texts[alert.step]
    notified = wandb_reader.of_type(path, "alert")
    serious = [a for a in watch.alerts if a.severity in ("warning", "error")]
    assert sorted(n.title for n in notified) == sorted(
        f"gradwatch: {a.kind.value}" for a in serious
    )
    (table,) = [
        r["gradwatch/alert_table"]
        for r in wandb_reader.history(path)
        if "gradwatch/alert_table" in r
    ]
    rows = wandb_reader.logged_table(path, table)
    assert rows["columns"] == ["step", "kind", "severity", "layers", "message", "advice"]
    assert [row[4] for row in rows["data"]] == [a.message for a in watch.alerts]


def test_wandb_sink_builds_before_wandb_init_and_uses_the_run_of_the_first_write(
    wandb_env: Any, tmp_path: Path
) -> None:
    sink = gw.WandbSink(send_alerts=False)
    run = wandb_env.init(project="gradwatch-test", dir=tmp_path, mode="offline")
    _plain_loop([sink])
    path = wandb_reader.run_file(run)
    run.finish()
    assert sink.run is run
    rows = wandb_reader.history(path)
    assert sum("gradwatch/grad_norm_total" in r for r in rows) == STEPS
    assert not wandb_reader.of_type(path, "alert")


# ---------------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store is opt-in in MLflow 3
    return mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())


def _new_run(client: Any) -> str:
    return client.create_run(client.create_experiment("gradwatch-test")).info.run_id


def test_mlflow_sink_keeps_every_step_and_writes_the_alert_text(
    mlflow_client: Any, tmp_path: Path
) -> None:
    run_id = _new_run(mlflow_client)
    watch = _plain_loop([gw.MlflowSink(run_id, mlflow_client)])

    history = sorted(
        mlflow_client.get_metric_history(run_id, "gradwatch/grad_norm_total"), key=lambda m: m.step
    )
    assert [m.step for m in history] == list(range(STEPS))
    assert [m.value for m in history] == pytest.approx(_totals(watch), rel=1e-5)
    layer_steps = mlflow_client.get_metric_history(run_id, "gradwatch/grad_norm/0")
    assert sorted(m.step for m in layer_steps) == [9, 19, 29]

    assert watch.alerts
    files = [a.path for a in mlflow_client.list_artifacts(run_id, "gradwatch/alerts")]
    assert files == sorted(
        f"gradwatch/alerts/step_{a.step:08d}_{a.kind.value}.md" for a in watch.alerts
    )
    text = Path(mlflow_client.download_artifacts(run_id, "gradwatch/alerts.md", tmp_path))
    for alert in watch.alerts:
        assert alert.message in text.read_text()
    tags = mlflow_client.get_run(run_id).data.tags
    for kind in {a.kind.value for a in watch.alerts}:
        assert tags[f"gradwatch.alerts.{kind}"] == str(
            sum(a.kind.value == kind for a in watch.alerts)
        )
    assert tags["gradwatch.last_alert"]


def test_mlflow_sink_names_the_root_layer_with_allowed_characters(mlflow_client: Any) -> None:
    run_id = _new_run(mlflow_client)
    _plain_loop([gw.MlflowSink(run_id, mlflow_client, prefix="gw/optimizer 0")], nn.Linear(8, 1))
    metrics = mlflow_client.get_run(run_id).data.metrics
    assert {"gw/optimizer 0/grad_norm/_root_", "gw/optimizer 0/weight_norm/_root_"} <= set(metrics)


# ---------------------------------------------------------------------- construction


@pytest.mark.parametrize(("sink", "module"), [("WandbSink", "wandb"), ("MlflowSink", "mlflow")])
def test_a_sink_without_its_library_says_how_to_install_it(
    sink: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=rf"pip install 'gradwatch\[{module}\]'"):
        getattr(gw, sink)()


def test_sinks_reject_bad_arguments_naming_them() -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    with pytest.raises(TypeError, match="run"):
        gw.WandbSink(run=object())
    with pytest.raises(ValueError, match="prefix"):
        gw.WandbSink(prefix="/")
    with pytest.raises(TypeError, match="run_id"):
        gw.MlflowSink(run_id=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="client"):
        gw.MlflowSink(client=object())


# ---------------------------------------------------------------------- log_metrics loggers


class _DirLogger:
    """A logger with ``log_metrics`` and a ``log_dir`` (as Lightning's CSVLogger)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = str(log_dir)
        self.steps: list[int] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.steps.append(step)


def test_logger_metrics_sink_appends_the_alert_text_to_the_log_dir(tmp_path: Path) -> None:
    logger = _DirLogger(tmp_path / "version_0")
    watch = _plain_loop([gw.LoggerMetricsSink(logger)])

    assert logger.steps == list(range(STEPS))
    text = (tmp_path / "version_0" / "gradwatch_alerts.md").read_text()
    assert watch.alerts
    for alert in watch.alerts:
        assert f"**{alert.kind.value}** ({alert.severity}) at step {alert.step}" in text
        assert alert.message in text
