"""GradWatchCallback inside real Lightning Trainers: steps, logging, remedies, checkpoints, DDP."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradwatch as gw
from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.detectors import Detector
from gradwatch.engine.observation import Decision, Detection, Observation, RemedyInput
from gradwatch.engine.records import FlushRecord
from gradwatch.engine.remedies import Remedy
from gradwatch.sinks.base import Sink
from tests import zoo

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402

from gradwatch import lightning as gl  # noqa: E402
from gradwatch.lightning import GradWatchCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|smaller than the logging interval|LeafSpec).*"
)


class Regression(pl.LightningModule):
    """``net`` fitted to the zoo's regression task with plain SGD."""

    def __init__(
        self, net: nn.Module, lr: float = 0.1, optimizer: str = "sgd", lr_decay: float = 1.0
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer_name = optimizer
        self.lr_decay = lr_decay  # per step, through a StepLR scheduler when < 1
        self.updates: list[float] = []  # norm of each step's parameter update
        self._before: torch.Tensor | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name in ("adam", "fused_adam"):
            fused = self.optimizer_name == "fused_adam"  # unscales inside step() under AMP
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=fused)
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.lr_decay == 1.0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.lr_decay)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._before = _flat_params(self)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.updates.append(float((_flat_params(self) - self._before).norm()))


class TwoNets(pl.LightningModule):
    """Manual optimization: two independent nets, each with its own optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
        self.b = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for net, optimizer in zip((self.a, self.b), self.optimizers(), strict=True):
            optimizer.zero_grad()
            self.manual_backward(F.mse_loss(net(x), y))
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.a.parameters(), lr=0.05),
            torch.optim.Adam(self.b.parameters(), lr=1e-3),
        ]


class NaNAtStep(Regression):
    """Its loss (hence every gradient) turns NaN at one global step."""

    def __init__(self, net: nn.Module, bad_step: int) -> None:
        super().__init__(net)
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.bad_step else loss


class SkipEvery(Remedy):
    """Test remedy: every update is skipped."""

    needs_optimizer = True

    def decide(self, view: RemedyInput) -> Decision:
        return Decision(skip=True)


class AlwaysFires(Detector):
    """Test detector: fires at every step, naming no layer."""

    kind = AlertKind.SPIKE

    def observe(self, obs: Observation) -> Detection:
        return Detection(fired=torch.ones(1, dtype=torch.bool), value=obs.totals)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return "test detection fired"


class RankFileSink(Sink):
    """Test sink: each write touches ``sink_rank<rank>`` in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def write(self, record: FlushRecord) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        (Path(self.directory) / f"sink_rank{rank}").touch()


class DumpHistory(pl.Callback):
    """Writes every rank's recorded steps and total norms to ``history_rank<rank>.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        watch = next(c for c in trainer.callbacks if isinstance(c, GradWatchCallback)).watch
        history = watch.history()
        out = {"step": history["step"].tolist(), "net.0": history["net.0"].tolist()}
        path = Path(self.directory) / f"history_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(out))


def _flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def _total_norms(watch: gw.GradWatch) -> np.ndarray:
    history = watch.history()
    return np.sqrt(sum(history[name].astype(np.float64) ** 2 for name in watch.layer_names))


def _loader(batch_size: int = 32) -> DataLoader:
    x, y = zoo.regression_data(n=256)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 6,
        "log_every_n_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _scalar_tags(logdir: str) -> set[str]:
    accumulator = EventAccumulator(logdir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"nonfinite": "stop"}, ValueError, "nonfinite"),
        ({"remedies": [object()]}, TypeError, "remedies"),
        ({"sinks": [object()]}, TypeError, "sinks"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        GradWatchCallback(**kwargs)


def test_state_key_is_built_from_the_arguments() -> None:
    plain = GradWatchCallback(detectors=())
    clipping = GradWatchCallback(detectors=(), remedies=[gw.ClipNorm(1.0)])
    assert plain.state_key != clipping.state_key
    same = GradWatchCallback(detectors=(), remedies=[gw.ClipNorm(2.0)])
    assert clipping.state_key == same.state_key


def test_callback_derives_from_every_installed_lightning_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    legacy = types.SimpleNamespace(Callback=type("Callback", (), {}))
    unified = types.SimpleNamespace(Callback=type("Callback", (), {}))
    monkeypatch.setattr(gl, "_import_installed", lambda suffix: [legacy, unified])
    base = gl._callback_base()
    assert issubclass(base, legacy.Callback) and issubclass(base, unified.Callback)
    monkeypatch.setattr(gl, "_import_installed", lambda suffix: [unified])
    assert gl._callback_base() is unified.Callback
    monkeypatch.setattr(gl, "_import_installed", lambda suffix: [])
    with pytest.raises(ImportError, match="pip install"):
        gl._callback_base()


# ---------------------------------------------------------------------- steps and logging


def test_vanishing_in_deep_sigmoid_module_reaches_tensorboard_logger(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regression(zoo.deep_mlp(nn.Sigmoid, depth=20))
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = GradWatchCallback()
    trainer = _trainer(tmp_path, [callback], max_steps=40, log_every_n_steps=10, logger=logger)
    trainer.fit(model, _loader())

    vanishing = [a for a in callback.alerts if a.kind is AlertKind.VANISHING]
    assert vanishing, callback.alerts
    assert vanishing[0].layers[0] == "net.0"
    assert callback.watch is not None and callback.watch.config.log_every_n_steps == 10
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert {f.parent for f in event_files} == {Path(logger.log_dir)}  # no second event tree
    tags = _scalar_tags(logger.log_dir)
    assert {"gradwatch/grad_norm_total", "gradwatch/grad_norm/net.0"} <= tags
    assert "gradwatch/alerts/vanishing" in tags


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    callback = GradWatchCallback(detectors=(), log_every_n_steps=1)
    trainer = _trainer(tmp_path, [callback], max_steps=5, accumulate_grad_batches=3)
    trainer.fit(Regression(_small_net()), _loader(batch_size=16))

    assert trainer.global_step == 5
    assert callback.watch.history()["step"].tolist() == [0, 1, 2, 3, 4]


def test_log_every_n_steps_none_follows_the_trainer(tmp_path: Path) -> None:
    callback = GradWatchCallback(detectors=())
    _trainer(tmp_path, [callback], max_steps=1, log_every_n_steps=7).fit(
        Regression(_small_net()), _loader()
    )
    assert callback.watch.config.log_every_n_steps == 7


def test_csv_logger_receives_the_scalars(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    callback = GradWatchCallback(detectors=(), log_every_n_steps=3)
    trainer = _trainer(tmp_path, [callback], max_steps=6, logger=logger)
    trainer.fit(Regression(_small_net()), _loader())

    with open(Path(logger.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    totals = {
        int(r["step"]): float(r["gradwatch/grad_norm_total"])
        for r in rows
        if r.get("gradwatch/grad_norm_total")
    }
    assert sorted(totals) == [0, 1, 2, 3, 4, 5]
    last = next(r for r in rows if r.get("gradwatch/grad_norm/net.0") and r["step"] == "5")
    expected = callback.watch.last_norms()["net.0"]
    assert float(last["gradwatch/grad_norm/net.0"]) == pytest.approx(expected, rel=1e-5)
    assert "gradwatch/weight_norm/net.2" in rows[0]


def test_without_logger_nothing_is_written_and_alerts_still_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    callback = GradWatchCallback(detectors=[AlwaysFires()], log_every_n_steps=2)
    _trainer(tmp_path, [callback], max_steps=4).fit(Regression(_small_net()), _loader())

    assert [a.message for a in callback.alerts] == ["test detection fired"]
    assert list(tmp_path.iterdir()) == []
    assert "test detection fired" in capsys.readouterr().out  # the summary printed at fit end


class _RecordingLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((step, metrics))


def _record(steps: list[int], alert_counts: dict[str, int]) -> FlushRecord:
    k = len(steps)
    return FlushRecord(
        layer_names=["", "head"],
        steps=np.asarray(steps),
        grad_norms=np.arange(2 * k, dtype=np.float32).reshape(k, 2),
        total_norms=np.full(k, 3.0, dtype=np.float32),
        clip_coefs=np.full(k, 0.5, dtype=np.float32),
        lr_scales=None,
        weight_norms=np.asarray([1.0, 2.0], dtype=np.float32),
        update_ratios=None,
        alert_counts=alert_counts,
    )


def test_logger_metrics_sink_writes_every_step_window_summaries_and_alert_counts() -> None:
    logger = _RecordingLogger()
    sink = gw.LoggerMetricsSink(logger, prefix="gradwatch/optimizer_1")
    sink.write(_record([4, 5], {"spike": 1}))
    sink.write(_record([6], {"spike": 1}))

    assert [step for step, _ in logger.calls] == [4, 5, 6]
    first = logger.calls[0][1]
    assert first["gradwatch/optimizer_1/grad_norm_total"] == 3.0
    assert first["gradwatch/optimizer_1/clip_coef"] == 0.5
    assert first["gradwatch/optimizer_1/depth/output_third_log10"] == pytest.approx(0.0)  # log10 1
    assert not any("grad_norm/" in tag for tag in first)  # per-layer values at the newest step
    newest = logger.calls[1][1]
    assert newest["gradwatch/optimizer_1/grad_norm/<root>"] == 2.0
    assert newest["gradwatch/optimizer_1/grad_norm_max/head"] == 3.0  # rows [0, 1] and [2, 3]
    assert newest["gradwatch/optimizer_1/grad_norm_min/head"] == 1.0
    assert newest["gradwatch/optimizer_1/weight_norm/head"] == 2.0
    assert newest["gradwatch/optimizer_1/alerts/spike"] == 1.0
    assert logger.calls[2][1]["gradwatch/optimizer_1/alerts/spike"] == 1.0  # carried on
    with pytest.raises(TypeError, match="log_metrics"):
        gw.LoggerMetricsSink(object())


# ---------------------------------------------------------------------- remedies and AMP


def test_clip_remedy_is_visible_in_the_update_the_optimizer_makes(tmp_path: Path) -> None:
    max_norm, lr = 0.01, 1.0
    model = Regression(_small_net(), lr=lr)
    clip = gw.ClipNorm(max_norm)
    callback = GradWatchCallback(detectors=(), remedies=[clip], log_every_n_steps=1)
    _trainer(tmp_path, [callback], max_steps=4).fit(model, _loader())

    raw_totals = _total_norms(callback.watch)  # measured before any remedy
    assert len(raw_totals) == 4 and (raw_totals > 10 * max_norm).all()
    assert model.updates == pytest.approx([lr * max_norm] * 4, rel=1e-4)


def test_lightning_gradient_clipping_runs_after_gradwatch(tmp_path: Path) -> None:
    clip_val, lr = 0.005, 1.0
    model = Regression(_small_net(), lr=lr)
    callback = GradWatchCallback(detectors=(), log_every_n_steps=1)
    _trainer(tmp_path, [callback], max_steps=3, gradient_clip_val=clip_val).fit(model, _loader())

    # gradwatch saw the unclipped gradients; the optimizer used Lightning's clipped ones
    assert (_total_norms(callback.watch) > 10 * clip_val).all()
    assert model.updates == pytest.approx([lr * clip_val] * 3, rel=1e-4)


def test_lr_backoff_acts_on_the_same_step_and_composes_with_the_scheduler(
    tmp_path: Path,
) -> None:
    decay, steps = 0.9, 4
    model = Regression(_small_net(), lr=1.0, lr_decay=decay)
    backoff = gw.LRBackoff(factor=0.5, on=("spike",), cooldown=1)  # compound every step
    callback = GradWatchCallback(detectors=[AlwaysFires()], remedies=[backoff], log_every_n_steps=1)
    trainer = _trainer(tmp_path, [callback], max_steps=steps)
    trainer.fit(model, _loader())

    # every step is flagged: its own update already uses the scheduler's lr times 0.5 ** (k + 1)
    expected = [decay**k * 0.5 ** (k + 1) * n for k, n in enumerate(_total_norms(callback.watch))]
    assert model.updates == pytest.approx(expected, rel=1e-4)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(decay**steps)


def test_skipped_step_leaves_parameters_and_optimizer_state_untouched(tmp_path: Path) -> None:
    model = Regression(_small_net(), lr=0.1, optimizer="adam")
    before = _flat_params(model)
    callback = GradWatchCallback(detectors=(), remedies=[SkipEvery()], log_every_n_steps=1)
    trainer = _trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(model, _loader())

    assert trainer.global_step == 3
    assert torch.equal(_flat_params(model), before)
    assert trainer.optimizers[0].state_dict()["state"] == {}


def test_nonfinite_raise_stops_training_through_the_trainer(tmp_path: Path) -> None:
    model = NaNAtStep(_small_net(), bad_step=2)
    callback = GradWatchCallback(detectors=(), nonfinite="raise")
    trainer = _trainer(tmp_path, [callback], max_steps=20)
    trainer.fit(model, _loader())

    assert trainer.global_step == 3  # steps 0, 1 and the poisoned step 2, then the stop
    assert isinstance(callback.stopped_by, gw.GradientError)
    assert torch.isfinite(_flat_params(model)).all()  # the poisoned update did not happen


@pytest.mark.parametrize("optimizer", ["sgd", "fused_adam"])
def test_amp_gradients_are_watched_unscaled_with_the_trainer_scaler(
    tmp_path: Path, optimizer: str
) -> None:
    scaler = torch.amp.GradScaler("cpu")  # initial scale 65536
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model = Regression(_small_net(), lr=1e-3, optimizer=optimizer)
    before = _flat_params(model)
    callback = GradWatchCallback(detectors=(), log_every_n_steps=1)
    _trainer(tmp_path, [callback], max_steps=3, plugins=[precision]).fit(model, _loader())

    assert callback.watch.scaler is scaler
    norms = _total_norms(callback.watch)
    assert len(norms) == 3 and (norms < 100.0).all()  # unscaled (scaled ones are ~65536x larger)
    after = _flat_params(model)
    assert torch.isfinite(after).all() and not torch.equal(after, before)


@pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU")
def test_remedies_act_inside_a_fused_optimizer_under_cpu_mixed_precision(tmp_path: Path) -> None:
    """On CPU "16-mixed" is bfloat16 without a scaler: the optimizer step runs the closure (and the
    watch) after its pre-hooks, and the kernel still reads the clip divisor and the skip flag."""
    model = NaNAtStep(_small_net(), bad_step=2)
    model.optimizer_name = "fused_adam"
    callback = GradWatchCallback(
        detectors=(), remedies=[gw.ClipNorm(0.01), gw.SkipStep()], log_every_n_steps=1
    )
    trainer = _trainer(tmp_path, [callback], max_steps=5, precision="16-mixed")
    trainer.fit(model, _loader())

    assert callback.watch.engine.fused
    optimizer = trainer.optimizers[0]
    assert int(optimizer.state[model.net[0].weight]["step"]) == 4  # step 2 skipped in the kernel
    assert model.updates[2] == 0.0 and all(u > 0 for i, u in enumerate(model.updates) if i != 2)
    assert torch.isfinite(_flat_params(model)).all()
    assert "grad_scale" not in optimizer.__dict__ and "found_inf" not in optimizer.__dict__


def test_trainer_gradient_clipping_keeps_the_remedies_explicit(tmp_path: Path) -> None:
    model = Regression(_small_net(), lr=1e-3, optimizer="fused_adam")
    callback = GradWatchCallback(detectors=(), remedies=[gw.ClipNorm(1.0)])
    _trainer(tmp_path, [callback], max_steps=2, gradient_clip_val=0.5).fit(model, _loader())
    assert callback.watch is not None and not callback.watch.engine.fused


# ---------------------------------------------------------------------- several optimizers


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    callback = GradWatchCallback(detectors=(), log_every_n_steps=2)
    trainer = _trainer(tmp_path, [callback], max_steps=8, logger=logger)
    trainer.fit(TwoNets(), _loader())

    first, second = callback.watches
    assert first.layer_names == ["a.0", "a.2"]
    assert second.layer_names == ["b.0", "b.2"]
    assert first.history()["step"].tolist() == [0, 2, 4, 6]  # trainer.global_step of each update
    assert second.history()["step"].tolist() == [1, 3, 5, 7]
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))

    def flushed_at(tag: str) -> list[int]:
        return [int(r["step"]) for r in rows if r.get(tag)]

    # a flush at every step that reaches or passes a multiple of 2, although the steps have gaps
    assert flushed_at("gradwatch/optimizer_0/grad_norm/a.0") == [2, 4, 6]
    assert flushed_at("gradwatch/optimizer_1/grad_norm/b.0") == [1, 3, 5, 7]


# ---------------------------------------------------------------------- checkpoints


def _fit_and_save(tmp_path: Path, steps: int) -> tuple[Path, GradWatchCallback]:
    callback = GradWatchCallback(detectors=[AlwaysFires()], log_every_n_steps=2)
    trainer = _trainer(tmp_path, [callback], max_steps=steps)
    trainer.fit(Regression(_small_net()), _loader(batch_size=64))  # 4 batches: ends an epoch
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path, callback


def test_resume_from_checkpoint_continues_the_history(tmp_path: Path) -> None:
    path, first = _fit_and_save(tmp_path, steps=4)
    torch.load(path, weights_only=True)  # plain values only

    callback = GradWatchCallback(detectors=[AlwaysFires()], log_every_n_steps=2)
    trainer = _trainer(tmp_path, [callback], max_steps=8)
    trainer.fit(Regression(_small_net()), _loader(batch_size=64), ckpt_path=path)

    assert callback.watch.history()["step"].tolist() == list(range(8))
    assert [a.step for a in callback.alerts] == [a.step for a in first.alerts] == [0]


def test_checkpoint_without_gradwatch_state_loads_with_a_warning(tmp_path: Path) -> None:
    path, _ = _fit_and_save(tmp_path, steps=4)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"] = {}
    torch.save(checkpoint, path)

    callback = GradWatchCallback(detectors=(), log_every_n_steps=2)
    trainer = _trainer(tmp_path, [callback], max_steps=6)
    with pytest.warns(UserWarning, match="holds no GradWatchCallback state"):
        trainer.fit(Regression(_small_net()), _loader(batch_size=64), ckpt_path=path)
    assert callback.watch.history()["step"].tolist() == [4, 5]


# ---------------------------------------------------------------------- distributed


@pytest.mark.distributed
def test_ddp_spawn_every_rank_computes_and_rank_zero_alone_writes(tmp_path: Path) -> None:
    callback = GradWatchCallback(
        detectors=(), log_every_n_steps=2, sinks=[RankFileSink(str(tmp_path))]
    )
    trainer = _trainer(
        tmp_path,
        [callback, DumpHistory(str(tmp_path))],
        strategy="ddp_spawn",
        devices=2,
        max_steps=4,
    )
    trainer.fit(Regression(_small_net()), _loader())

    assert (tmp_path / "sink_rank0").exists()
    assert not (tmp_path / "sink_rank1").exists()
    histories = [json.loads((tmp_path / f"history_rank{r}.json").read_text()) for r in (0, 1)]
    assert histories[0]["step"] == [0, 1, 2, 3]
    assert histories[0] == histories[1]  # DDP-reduced gradients: identical numbers on both ranks
    assert callback.watch is None  # the main process holds a copy that never ran
