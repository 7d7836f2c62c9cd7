"""The Lightning callback under both package names, alone and together, and with W&B / MLflow
loggers (alert text included)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.detectors import Detector
from gradwatch.engine.observation import Detection, Observation
from tests import wandb_reader

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|smaller than the logging interval|LeafSpec).*"
)
ROOT = Path(__file__).resolve().parents[1]


def _package(name: str) -> Any:
    return pytest.importorskip(name)


class AlwaysFires(Detector):
    """Test detector: fires at every step."""

    kind = AlertKind.SPIKE

    def observe(self, obs: Observation) -> Detection:
        return Detection(fired=torch.ones(1, dtype=torch.bool), value=obs.totals)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return "test detection fired"


def _fit(pl: Any, tmp_path: Path, callback: Any, **kwargs: Any) -> Any:
    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 4, generator=generator), torch.randn(64, 1, generator=generator)
    )
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": 6,
        "log_every_n_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    options.update(kwargs)
    trainer = pl.Trainer(callbacks=[callback], **options)
    trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
    return trainer


@pytest.mark.parametrize("package", PACKAGES)
def test_the_callback_records_raw_gradients_in_each_trainer(package: str, tmp_path: Path) -> None:
    pl = _package(package)
    from gradwatch.lightning import GradWatchCallback

    callback = GradWatchCallback(detectors=(), log_every_n_steps=2)
    _fit(pl, tmp_path, callback, gradient_clip_val=1e-3)
    history = callback.watch.history()
    assert history["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert (history["net.0"] > 1e-3).all()  # recorded before Lightning's clipping


@pytest.mark.parametrize("hidden", ["lightning", "pytorch_lightning"])
def test_the_callback_works_with_only_one_package_installed(hidden: str, tmp_path: Path) -> None:
    available = "pytorch_lightning" if hidden == "lightning" else "lightning.pytorch"
    _package(available)
    script = textwrap.dedent(
        f"""
        import sys

        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name == {hidden!r} or name.startswith({hidden!r} + "."):
                    raise ImportError(name + " hidden for this test")

        sys.meta_path.insert(0, Hide())
        import importlib
        import warnings
        warnings.simplefilter("ignore")
        from pathlib import Path
        from tests.test_lightning_packages import _fit
        from gradwatch.lightning import GradWatchCallback

        pl = importlib.import_module({available!r})
        bases = [b.__module__.split(".")[0] for b in GradWatchCallback.__mro__[1:3]]
        assert {hidden!r} not in sys.modules, "hidden package imported"
        callback = GradWatchCallback(detectors=(), log_every_n_steps=2)
        _fit(pl, Path(sys.argv[1]), callback)
        print(bases, callback.watch.history()["step"].tolist())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("[0, 1, 2, 3, 4, 5]"), done.stdout


@pytest.mark.parametrize("package", PACKAGES)
def test_wandb_logger_gets_every_step_and_the_alert_text(
    package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pl = _package(package)
    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)  # wandb may write debug files under the working directory
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = importlib.import_module(f"{package}.loggers")
    from gradwatch.lightning import GradWatchCallback

    logger = loggers.WandbLogger(project="gradwatch-test", save_dir=str(tmp_path), offline=True)
    callback = GradWatchCallback(detectors=[AlwaysFires()], log_every_n_steps=3)
    _fit(pl, tmp_path, callback, logger=logger)
    path = wandb_reader.run_file(logger.experiment)
    logger.experiment.finish()

    rows = wandb_reader.history(path)
    assert [r["gradwatch/step"] for r in rows if "gradwatch/grad_norm_total" in r] == list(range(6))
    texts = [r["gradwatch/alert_text"] for r in rows if "gradwatch/alert_text" in r]
    assert len(texts) == 1 and "test detection fired" in texts[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_mlflow_logger_gets_every_step_and_the_alert_text(
    package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pl = _package(package)
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    loggers = importlib.import_module(f"{package}.loggers")
    from gradwatch.lightning import GradWatchCallback

    logger = loggers.MLFlowLogger(tracking_uri=(tmp_path / "mlruns").as_uri())
    callback = GradWatchCallback(detectors=[AlwaysFires()], log_every_n_steps=3)
    _fit(pl, tmp_path, callback, logger=logger)

    client = logger.experiment
    history = client.get_metric_history(logger.run_id, "gradwatch/grad_norm_total")
    assert sorted(m.step for m in history) == list(range(6))
    assert "gradwatch/grad_norm/net.0" in client.get_run(logger.run_id).data.metrics
    (artifact,) = client.list_artifacts(logger.run_id, "gradwatch/alerts")
    text = Path(client.download_artifacts(logger.run_id, artifact.path, str(tmp_path)))
    assert "test detection fired" in text.read_text()


@pytest.mark.parametrize("package", PACKAGES)
def test_csv_logger_gets_the_alert_text_beside_its_metrics(package: str, tmp_path: Path) -> None:
    pl = _package(package)
    loggers = importlib.import_module(f"{package}.loggers")
    from gradwatch.lightning import GradWatchCallback

    logger = loggers.CSVLogger(tmp_path, name="csv")
    callback = GradWatchCallback(detectors=[AlwaysFires()], log_every_n_steps=3)
    _fit(pl, tmp_path, callback, logger=logger)
    text = (Path(logger.log_dir) / "gradwatch_alerts.md").read_text()
    assert "**spike** (warning) at step 0" in text and "test detection fired" in text
