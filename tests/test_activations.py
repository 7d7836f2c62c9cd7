"""Activation monitor and the detectors that read it: saturation, dead units, first NaN output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.activations import ActivationMonitor
from gradwatch.engine.roles import Role
from gradwatch.engine.thresholds import SATURATION_MARGIN
from tests import zoo
from tests.helpers import count_syncs
from tests.tiny_models import tiny_transformers


def _train(
    model: nn.Module, steps: int, *, lr: float = 0.05, **watch_kwargs: object
) -> gw.GradWatch:
    x, y = zoo.regression_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    watch = gw.GradWatch(model, optimizer, check_activations=True, **watch_kwargs)  # type: ignore[arg-type]
    for _ in range(steps):
        index = torch.randint(0, len(x), (32,), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[index]), y[index])
        loss.backward()
        watch.step(loss=loss)
        optimizer.step()
    watch.close()
    return watch


# ----------------------------------------------------------------------------- the monitor


def test_monitor_hooks_activation_modules_only_and_removes_its_hooks() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Sigmoid(), nn.Tanh(), nn.ReLU(), nn.GELU(), nn.Identity()
    )
    monitor = ActivationMonitor(model)
    assert monitor.names == ["1", "2", "3", "4"]
    assert monitor.roles == [Role.SATURATING, Role.SATURATING, Role.RECTIFIER, Role.SMOOTH]
    assert all(len(model[i]._forward_hooks) == 1 for i in range(1, 5))
    monitor.remove()
    assert all(len(module._forward_hooks) == 0 for module in model)


def test_saturated_fraction_follows_the_definition_over_every_forward_of_the_step() -> None:
    model = nn.Sequential(nn.Sigmoid(), nn.Tanh())
    first = torch.tensor([[-10.0, -1.0, 0.0, 1.0, 10.0]], requires_grad=True)
    second = torch.tensor([[8.0, 8.0, 8.0, 8.0, 8.0]], requires_grad=True)
    expected = []
    for module in model:
        outputs = []
        for x in (first, second):  # gradient accumulation: two forwards in one step
            outputs.append(module(x if module is model[0] else torch.sigmoid(x)))
        margin = SATURATION_MARGIN
        y = torch.cat(outputs)
        flat = (y < margin) | (y > 1 - margin) if module is model[0] else y.abs() > 1 - margin
        expected.append(flat.float().mean().item())
    monitor = ActivationMonitor(model)
    model(first)
    model(second)
    stats = monitor.collect()
    assert stats is not None
    assert stats.saturated.tolist() == pytest.approx(expected)
    assert stats.ran.tolist() == [True, True]
    assert monitor.collect() is None  # cleared; no forward since


def test_many_forwards_in_one_step_are_folded_and_still_exact() -> None:
    model = nn.Sequential(nn.Sigmoid())
    monitor = ActivationMonitor(model)
    for index in range(40):  # one saturated input in 4, and a NaN in the 7th forward
        value = float("nan") if index == 6 else (20.0 if index % 4 == 0 else 0.0)
        model(torch.full((1, 5), value, requires_grad=True))
    assert len(monitor._saturated[0]) < 16
    stats = monitor.collect()
    assert stats is not None
    assert stats.saturated.tolist() == pytest.approx([10 / 40])


def test_forwards_without_autograd_are_not_recorded() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    monitor = ActivationMonitor(model)
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert monitor.collect() is None


def test_idle_steps_count_units_that_never_fire_features_and_channels() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        linear.bias[:2] = -100.0  # units 0 and 1 can never fire
        conv.bias[:1] = -100.0  # channel 0 can never fire
    dense = nn.Sequential(linear, nn.ReLU())
    conv_net = nn.Sequential(conv, nn.ReLU())
    dense_monitor, conv_monitor = ActivationMonitor(dense), ActivationMonitor(conv_net)
    for _ in range(3):  # three steps
        dense(torch.randn(16, 8))
        conv_net(torch.randn(4, 1, 6, 6))
        dense_stats, conv_stats = dense_monitor.collect(), conv_monitor.collect()
    assert dense_stats is not None and conv_stats is not None
    assert dense_stats.idle_steps.tolist() == [3.0, 3.0, 0.0, 0.0]
    assert conv_stats.idle_steps.tolist() == [3.0, 0.0, 0.0, 0.0]
    assert dense_stats.units.tolist() == [4.0] and dense_stats.unit_module.tolist() == [0] * 4
    assert dense_monitor.collect() is None  # no forward: nothing counted


# ----------------------------------------------------------------------------- saturation


def _large_init_tanh(scale: float) -> nn.Sequential:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.Tanh, depth=5)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.mul_(scale)
    return model


def test_saturation_fires_on_a_tanh_net_with_a_large_init() -> None:
    watch = _train(
        _large_init_tanh(10.0),
        40,
        lr=1e-3,
        detectors=[gw.SaturationDetector()],
        log_every_n_steps=10,
    )
    (alert,) = watch.alerts
    assert alert.kind is gw.AlertKind.SATURATION and alert.step == 19  # patience 20
    assert alert.layers[0] in {"1", "3", "5", "7"} and alert.value > 0.5
    assert "flat regions" in alert.message


def test_saturation_stays_quiet_on_a_default_tanh_and_sigmoid_net() -> None:
    for activation in (nn.Tanh, nn.Sigmoid):
        torch.manual_seed(0)
        watch = _train(
            zoo.deep_mlp(activation, depth=5),
            60,
            detectors=[gw.SaturationDetector(), gw.DeadUnitsDetector()],
            log_every_n_steps=20,
        )
        assert watch.alerts == []


def test_activation_detectors_without_hooks_warn_and_stay_quiet() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())
    with pytest.warns(RuntimeWarning, match="check_activations=True"):
        watch = gw.GradWatch(model, detectors=[gw.SaturationDetector()], log_every_n_steps=1)
    model(torch.randn(2, 4)).sum().backward()
    watch.step()
    watch.close()
    assert watch.alerts == []


# ----------------------------------------------------------------------------- dead units


def test_dead_units_fire_when_a_relu_layer_dies() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.ReLU, depth=4)
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the second hidden layer never fires
    watch = _train(
        model, 50, lr=1e-3, detectors=[gw.DeadUnitsDetector(window=25)], log_every_n_steps=25
    )
    (alert,) = watch.alerts
    assert alert.kind is gw.AlertKind.DEAD_UNITS and alert.layers == ("3",)
    assert alert.step == 19 and alert.value == 1.0  # a layer dead entirely: within 20 steps


def test_dead_units_stay_quiet_on_a_healthy_relu_net() -> None:
    torch.manual_seed(0)
    watch = _train(
        zoo.deep_mlp(nn.ReLU, depth=4),
        100,
        lr=1e-2,
        detectors=[gw.DeadUnitsDetector()],
        log_every_n_steps=25,
    )
    assert watch.alerts == []


# ----------------------------------------------------------------------------- host syncs


def test_no_host_sync_between_flushes_with_every_detector() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32),
        nn.Sigmoid(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.GELU(),
        nn.Linear(32, 1),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(
        model, optimizer, log_every_n_steps=5, check_activations=True, track_updates=True
    )
    assert len(watch.detectors) == 9
    x, y = zoo.regression_data(n=32)
    per_step = []
    for _ in range(15):
        with count_syncs() as counts:
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            watch.step(loss=loss)
        per_step.append(dict(counts))
        optimizer.step()
        optimizer.zero_grad()
    watch.close()
    for step, counts in enumerate(per_step):
        if (step + 1) % 5:
            assert counts == {}, f"host sync at non-flush step {step}: {counts}"


# ----------------------------------------------------------- library activations, by role


@pytest.mark.parametrize(
    ("name", "classes"),
    [
        ("gpt2", {"NewGELUActivation"}),
        ("convnext", {"GELUActivation"}),
        ("llama", {"SiLUActivation"}),
    ],
)
def test_library_activation_modules_are_hooked_by_role(name: str, classes: set[str]) -> None:
    model = tiny_transformers(name)
    monitor = ActivationMonitor(model)
    hooked = {type(model.get_submodule(path)).__name__ for path in monitor.names}
    assert hooked == classes and set(monitor.roles) == {Role.SMOOTH}
    assert len(monitor.names) == 2  # one per block
    monitor.remove()


def test_a_tiny_gpt2_trains_with_activation_hooks_and_stays_quiet() -> None:
    model = tiny_transformers("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, optimizer, check_activations=True, log_every_n_steps=4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        ids = torch.randint(0, 40, (4, 12), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        watch.step(loss=loss)
        optimizer.step()
        optimizer.zero_grad()
    watch.close()
    stats_names = watch.engine.layout.activation_names
    assert len(stats_names) == 2
    assert not [a for a in watch.alerts if a.severity in ("warning", "error")]


def test_gelu_is_neither_saturating_nor_a_rectifier_that_can_die() -> None:
    """GELU/SiLU outputs are unbounded above and never exactly zero on a region: no flat-region
    fraction and no dead-unit counters, even when every input is very negative."""
    model = nn.Sequential(nn.GELU(), nn.SiLU())
    monitor = ActivationMonitor(model)
    model(torch.full((4, 3), -50.0, requires_grad=True))
    stats = monitor.collect()
    assert stats is not None and stats.ran.tolist() == [True, True]
    assert stats.saturated.tolist() == [0.0, 0.0] and stats.idle_steps.numel() == 0
    monitor.remove()


def test_lstm_gates_have_no_module_and_get_no_hook() -> None:
    """nn.LSTM computes its sigmoid/tanh gates inside one cell: nothing to hook, nothing faked."""
    assert ActivationMonitor(nn.LSTM(4, 8)).names == []
