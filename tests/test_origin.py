"""NaN origin: input, forward (which module), loss or backward, decided on the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.origin import OriginTracer
from tests.helpers import ONE_TRANSFER, NaNInBackward, count_syncs

POISON_STEP = 3


class LogOfShifted(nn.Module):
    """``log(x - shift)``: NaN once an input is below ``shift`` (the planted forward bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.abs() + 1.0 - self.shift)


class Net(nn.Module):
    """Linear -> ReLU -> Linear -> LogOfShifted -> Linear, with switches for each planted fault."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.log = LogOfShifted()
        self.head = nn.Linear(16, 1)
        self.nan_backward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.log(self.fc2(self.act(self.fc1(x))))
        if self.nan_backward:
            h = NaNInBackward.apply(h)
        return self.head(h)


def _run(
    plant: Callable[[Net, torch.Tensor, int], tuple[torch.Tensor, Callable]],
    *,
    steps: int = 6,
    **watch_kwargs: object,
) -> gw.GradWatch:
    """Trains ``Net`` for ``steps`` steps; ``plant(model, x, step)`` returns (batch, loss_fn)."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=4, **watch_kwargs)  # type: ignore[arg-type]
    for step in range(steps):
        x = torch.randn(16, 8)
        batch, loss_fn = plant(model, x, step)
        loss = loss_fn(model(batch))
        loss.backward()
        report = watch.step(loss=loss)
        if not report.skipped:
            optimizer.step()
        optimizer.zero_grad()
        model.log.shift = 0.0
        model.nan_backward = False
    watch.close()
    return watch


def _mse(output: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()


def _nan_input(model: Net, x: torch.Tensor, step: int) -> tuple[torch.Tensor, Callable]:
    if step == POISON_STEP:
        x = x.clone()
        x[3, 2] = float("nan")
    return x, _mse


def _nan_in_module(model: Net, x: torch.Tensor, step: int) -> tuple[torch.Tensor, Callable]:
    if step == POISON_STEP:
        model.log.shift = 1e6  # log of a negative number
    return x, _mse


def _log_zero_loss(model: Net, x: torch.Tensor, step: int) -> tuple[torch.Tensor, Callable]:
    if step == POISON_STEP:
        return x, lambda out: -torch.log(torch.sigmoid(out) * 0.0).mean()
    return x, _mse


def _nan_backward(model: Net, x: torch.Tensor, step: int) -> tuple[torch.Tensor, Callable]:
    model.nan_backward = step == POISON_STEP
    return x, _mse


def _nonfinite(watch: gw.GradWatch) -> gw.Alert:
    (alert,) = [a for a in watch.alerts if a.kind is gw.AlertKind.NONFINITE]
    assert alert.step == POISON_STEP and alert.severity == "error"
    return alert


@pytest.mark.parametrize("check_activations", [False, True])
def test_nan_in_the_input_batch_is_origin_input_with_data_pipeline_advice(
    check_activations: bool,
) -> None:
    alert = _nonfinite(_run(_nan_input, check_activations=check_activations))
    assert alert.value == gw.Origin.INPUT and "origin: input" in alert.message
    assert alert.layers == ()
    assert "data pipeline" in alert.advice[0]
    assert not any("learning rate" in item for item in alert.advice)


def test_nan_made_inside_one_module_is_origin_forward_naming_that_module() -> None:
    alert = _nonfinite(_run(_nan_in_module, check_activations=True))
    assert alert.value == gw.Origin.FORWARD and "origin: forward" in alert.message
    assert alert.layers == ("log",) and "output of 'log'" in alert.message
    assert alert.advice[0].startswith("look in the forward of 'log' for log/sqrt")
    assert not any("learning rate" in item for item in alert.advice)


def test_by_default_a_forward_nan_is_origin_forward_at_the_model_output() -> None:
    alert = _nonfinite(_run(_nan_in_module))
    assert alert.value == gw.Origin.FORWARD and alert.layers == ("",)
    assert "the model's output" in alert.message and "check_activations=True" in alert.message


def test_log_of_zero_in_the_loss_is_origin_loss() -> None:
    alert = _nonfinite(_run(_log_zero_loss, check_activations=True))
    assert alert.value == gw.Origin.LOSS and "origin: loss" in alert.message
    assert alert.layers == ()
    assert "log(0)" in alert.advice[0]


def test_backward_only_nan_is_origin_backward_naming_the_deepest_layer() -> None:
    alert = _nonfinite(_run(_nan_backward, check_activations=True))
    assert alert.value == gw.Origin.BACKWARD and "origin: backward" in alert.message
    # the NaN gradient enters below ``head``: fc2 is the deepest non-finite layer
    assert alert.layers == ("fc2", "fc1")
    assert alert.advice[0].startswith("lower the learning rate (now 0.01 for SGD)")


def test_a_nan_input_the_model_masks_out_stays_quiet() -> None:
    class Masking(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.nan_to_num(x))

    model = Masking()
    watch = gw.GradWatch(model, log_every_n_steps=1)
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    loss = model(x).pow(2).mean()
    loss.backward()
    watch.step(loss=loss)
    watch.close()
    assert watch.alerts == []


def test_the_loss_entry_of_a_dict_output_is_left_to_the_loss_check() -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.fc(x)
            return {"logits": logits, "loss": torch.log(logits.sum() * 0.0)}

    model = WithLoss()
    watch = gw.GradWatch(model, log_every_n_steps=1)
    out = model(torch.randn(8, 4))
    out["loss"].backward()
    watch.step(loss=out["loss"])
    watch.close()
    (alert,) = watch.alerts
    assert alert.value == gw.Origin.LOSS


def test_entry_points_move_down_when_the_root_forward_never_runs() -> None:
    """A LightningModule-like root whose training code calls its children directly."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 8), LogOfShifted())
            self.head = nn.Linear(8, 1)

    model = Wrapper()
    tracer = OriginTracer(model)
    cpu = torch.device("cpu")
    x = torch.randn(8, 4, requires_grad=True)
    for _ in range(2):  # the root never runs: nothing seen; after two steps its children are hooked
        model.head(model.encoder(x))
        assert tracer.collect(cpu) is None
    model.head(model.encoder(x))
    clean = tracer.collect(cpu)
    assert clean is not None and not clean.input_first and not clean.output_bad
    model.encoder[1].shift = 1e6
    model.head(model.encoder(x))  # the encoder's NaN output reaches the head's input
    broken = tracer.collect(cpu)
    assert broken is not None and not broken.input_first and broken.output_bad
    assert tracer.names[int(broken.module)] == "encoder"
    model.encoder[1].shift = 0.0
    bad = x.detach().clone()
    bad[0, 0] = float("nan")
    model.head(model.encoder(bad.requires_grad_()))
    poisoned = tracer.collect(cpu)
    assert poisoned is not None and poisoned.input_first
    tracer.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_forwards_without_autograd_are_not_checked() -> None:
    model = nn.Linear(4, 1)
    tracer = OriginTracer(model, modules=True)
    with torch.no_grad():
        model(torch.full((2, 4), float("nan")))
    assert tracer.collect(torch.device("cpu")) is None
    tracer.remove()


@pytest.mark.parametrize("check_activations", [False, True])
def test_no_host_sync_in_step_with_the_origin_checks(check_activations: bool) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=5, check_activations=check_activations)
    per_step = []
    for step in range(10):
        x, loss_fn = _nan_input(model, torch.randn(16, 8), step)
        with count_syncs() as counts:
            loss = loss_fn(model(x))
            loss.backward()
            watch.step(loss=loss)
        per_step.append(dict(counts))
        optimizer.zero_grad()
    watch.close()
    # healthy steps read nothing; the NaN step's alert is delivered at once (one transfer)
    expected = [ONE_TRANSFER if step == POISON_STEP else {} for step in range(10)]
    assert [c for step, c in enumerate(per_step) if (step + 1) % 5] == [
        e for step, e in enumerate(expected) if (step + 1) % 5
    ]
    assert _nonfinite(watch).value == gw.Origin.INPUT


def test_lightning_module_calling_its_net_directly_gets_the_input_origin(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from gradwatch.lightning import GradWatchCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
            x, y = batch
            if self.global_step == 4:
                x = x.clone()
                x[0, 0] = float("nan")
            return nn.functional.mse_loss(self.net(x), y)  # the root's forward never runs

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = torch.utils.data.TensorDataset(torch.randn(128, 8), torch.randn(128, 1))
    callback = GradWatchCallback(log_every_n_steps=2)
    trainer = pl.Trainer(
        callbacks=[callback],
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
    (alert,) = [a for a in callback.alerts if a.kind is gw.AlertKind.NONFINITE]
    assert alert.step == 4 and alert.value == gw.Origin.INPUT
