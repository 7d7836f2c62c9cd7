"""AMP: GradScaler overflow steps are info, kept out of the statistics; real NaNs still surface."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch as gw
from tests import zoo


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )


def _train_amp(
    model: nn.Module, steps: int, *, init_scale: float, pass_loss: bool = True
) -> tuple[gw.GradWatch, torch.amp.GradScaler, list[float]]:
    """A plain float16 autocast loop with a GradScaler; returns the watch, scaler and scales."""
    x, y = zoo.regression_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    watch = gw.GradWatch(model, optimizer, scaler=scaler, log_every_n_steps=10)
    generator = torch.Generator().manual_seed(0)
    scales = []
    for _ in range(steps):
        index = torch.randint(0, len(x), (32,), generator=generator)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x[index])
        loss = nn.functional.mse_loss(out.float(), y[index])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        watch.step(loss=loss if pass_loss else None)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        scales.append(scaler.get_scale())
    watch.close()
    return watch, scaler, scales


def test_scaler_backoff_overflows_are_info_and_stay_out_of_the_statistics() -> None:
    model = _mlp()
    watch, _, scales = _train_amp(model, 80, init_scale=2.0**40)
    overflow_steps = sum(
        1 for before, after in zip([2.0**40, *scales], scales, strict=False) if after < before
    )
    assert 10 < overflow_steps < 40  # the scaler really backed off for many steps in a row
    kinds = [alert.kind for alert in watch.alerts]
    assert gw.AlertKind.AMP_OVERFLOW in kinds
    overflow = next(a for a in watch.alerts if a.kind is gw.AlertKind.AMP_OVERFLOW)
    assert overflow.severity == "info" and overflow.step == 0
    assert all(alert.severity == "info" for alert in watch.alerts), watch.alerts
    # Not poisoned: the spike statistics only saw finite, valid steps.
    spike = next(d for d in watch.detectors if isinstance(d, gw.SpikeDetector))
    state = spike.state_dict()
    assert all(math.isfinite(v) for v in state["mean"] + state["var"])
    assert state["count"][-1] == pytest.approx(80 - overflow_steps)
    assert watch.history()["step"].tolist()[-1] == 79


def test_nan_weights_under_a_scaler_are_reported_as_nonfinite() -> None:
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    watch, _, _ = _train_amp(model, 30, init_scale=2.0**16, pass_loss=False)
    nonfinite = [a for a in watch.alerts if a.kind is gw.AlertKind.NONFINITE]
    assert len(nonfinite) == 1 and nonfinite[0].severity == "error"
    # The scaler first backs off (overflow, info); once its scale drops below 1 it is persistent.
    assert 0 < nonfinite[0].step < 30
    assert watch.alerts[0].kind is gw.AlertKind.AMP_OVERFLOW
    # A NaN weight poisons the forward pass: the model's output is NaN with a finite input.
    assert nonfinite[0].layers == ("",) and "origin: forward" in nonfinite[0].message


def test_a_nan_loss_under_a_scaler_is_reported_at_once() -> None:
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    watch, _, _ = _train_amp(model, 10, init_scale=2.0**16)
    nonfinite = [a for a in watch.alerts if a.kind is gw.AlertKind.NONFINITE]
    assert len(nonfinite) == 1 and nonfinite[0].step == 0
