"""Detectors: each must fire on its pathology and stay quiet on healthy training."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.detectors import default_detectors
from tests import zoo
from tests.helpers import NaNInBackward

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn,
    *,
    steps: int,
    optimizer: torch.optim.Optimizer,
    batch: int = 32,
    stop_on_nan: bool = False,
    **watch_kwargs: object,
) -> tuple[gw.GradWatch, list[float]]:
    """Trains with a watch; returns the closed watch and the loss of every step."""
    x, y = data
    generator = torch.Generator().manual_seed(0)
    losses: list[float] = []
    watch = gw.GradWatch(model, optimizer, **watch_kwargs)  # type: ignore[arg-type]
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        optimizer.zero_grad()
        loss = loss_fn(model(x[index]), y[index])
        loss.backward()
        watch.step(loss=loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        if stop_on_nan and not math.isfinite(losses[-1]):
            break
    watch.close()
    return watch, losses


def _kinds(watch: gw.GradWatch) -> list[str]:
    return [alert.kind.value for alert in watch.alerts]


def _loud(watch: gw.GradWatch) -> list[gw.Alert]:
    return [alert for alert in watch.alerts if alert.severity in ("warning", "error")]


def _sequence_data(seq_len: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, seq_len, 8, generator=generator)
    return x, x[:, :, 0].mean(1, keepdim=True)


def _image_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(256, 1, 16, 16, generator=generator), torch.randint(
        0, 10, (256,), generator=generator
    )


# ----------------------------------------------------------------------------- configuration


def test_default_detectors_grow_with_the_options() -> None:
    kinds = [type(d).__name__ for d in default_detectors()]
    assert kinds == [
        "VanishingDetector",
        "ExplodingDetector",
        "ExplodingProfileDetector",
        "SpikeDetector",
        "NonFiniteDetector",
        "ZeroGradientDetector",
    ]
    with_activations = [type(d).__name__ for d in default_detectors(check_activations=True)]
    assert with_activations[6:] == ["SaturationDetector", "DeadUnitsDetector"]
    everything = [
        type(d).__name__ for d in default_detectors(check_activations=True, track_updates=True)
    ]
    assert everything[-1] == "StagnationDetector" and len(everything) == 9


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: gw.VanishingDetector(ratio=2.0), "ratio.*2.0"),
        (lambda: gw.VanishingDetector(patience=0), "patience.*0"),
        (lambda: gw.ExplodingDetector(adaptive_ratio=-1.0), "adaptive_ratio.*-1.0"),
        (lambda: gw.ExplodingDetector(sgd_ratio=-1.0), "sgd_ratio.*-1.0"),
        (lambda: gw.ExplodingDetector(weight_floor=1.5), "weight_floor.*1.5"),
        (lambda: gw.ExplodingProfileDetector(ratio=0.5), "ratio.*0.5"),
        (lambda: gw.ExplodingProfileDetector(once=0.5), "once.*0.5"),
        (lambda: gw.SpikeDetector(layer_min_ratio=0.5), "layer_min_ratio.*0.5"),
        (lambda: gw.ZeroGradientDetector(patience=0), "patience.*0"),
        (lambda: gw.NormGrowthDetector(growth=0.5), "growth.*0.5"),
        (lambda: gw.NormGrowthDetector(window=1), "window.*1"),
        (lambda: gw.DeadUnitsDetector(total_window=0), "total_window.*0"),
        (lambda: gw.SpikeDetector(z_threshold=0), "z_threshold.*0"),
        (lambda: gw.SpikeDetector(min_ratio=0.5), "min_ratio.*0.5"),
        (lambda: gw.SpikeDetector(beta=1.0), "beta.*1.0"),
        (lambda: gw.SpikeDetector(warmup=0), "warmup.*0"),
        (lambda: gw.SaturationDetector(fraction=0.0), "fraction.*0.0"),
        (lambda: gw.DeadUnitsDetector(window=0), "window.*0"),
        (lambda: gw.StagnationDetector(ratio=float("nan")), "ratio.*nan"),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(make, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"patience.*str"):
        gw.VanishingDetector(patience="10")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- vanishing


@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Tanh])
def test_vanishing_fires_within_40_steps_naming_the_first_layers(
    activation: type[nn.Module],
) -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watch, _ = _train(
        model,
        zoo.regression_data(),
        nn.functional.mse_loss,
        steps=40,
        optimizer=optimizer,
        log_every_n_steps=10,
    )
    vanishing = [a for a in watch.alerts if a.kind is gw.AlertKind.VANISHING]
    assert len(vanishing) == 1, watch.alerts
    alert = vanishing[0]
    assert alert.step < 40 and alert.severity == "warning"
    first_layers = set(watch.layer_names[:4])
    assert set(alert.layers[:2]) <= first_layers, alert.layers
    assert watch.layer_names[-1] not in alert.layers
    assert alert.value < alert.threshold == gw.VanishingDetector().threshold
    assert "vanish" in alert.message and f"; {alert.layers[0]}, " in alert.message


def test_vanishing_needs_patience_one_odd_step_never_fires() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.Sigmoid)
    detector = gw.VanishingDetector(patience=5)
    watch = gw.GradWatch(model, detectors=[detector], log_every_n_steps=1)
    x, y = zoo.regression_data()
    for _ in range(4):  # 4 vanishing steps < patience 5
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        watch.step()
    assert watch.alerts == []
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    watch.step()
    assert [a.step for a in watch.alerts] == [4]
    watch.close()


# ----------------------------------------------------------------------------- healthy models


def _healthy_cases() -> dict[
    str, Callable[[], tuple[nn.Module, tuple, LossFn, torch.optim.Optimizer]]
]:
    def relu_bn() -> tuple:
        model = zoo.relu_he_bn_mlp()
        return (
            model,
            zoo.regression_data(),
            nn.functional.mse_loss,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        )

    def residual() -> tuple:
        model = zoo.residual_mlp()
        return (
            model,
            zoo.regression_data(),
            nn.functional.mse_loss,
            torch.optim.Adam(model.parameters(), lr=1e-3),
        )

    def cnn() -> tuple:
        model = zoo.small_cnn()
        return (
            model,
            _image_data(),
            nn.functional.cross_entropy,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        )

    def lstm() -> tuple:
        model = zoo.SequenceRegressor("LSTM")
        return (
            model,
            _sequence_data(),
            nn.functional.mse_loss,
            torch.optim.Adam(model.parameters(), lr=1e-3),
        )

    return {"relu_he_bn_mlp": relu_bn, "residual_mlp": residual, "small_cnn": cnn, "lstm": lstm}


@pytest.mark.parametrize("case", list(_healthy_cases()))
def test_healthy_models_stay_quiet_for_150_steps(case: str) -> None:
    torch.manual_seed(0)
    model, data, loss_fn, optimizer = _healthy_cases()[case]()
    watch, losses = _train(
        model,
        data,
        loss_fn,
        steps=160,
        optimizer=optimizer,
        log_every_n_steps=20,
        check_activations=True,
        track_updates=True,
    )
    assert watch.step_count == 160 and len(watch.detectors) == 9
    assert _loud(watch) == []
    assert sum(losses[-20:]) < sum(losses[:20])  # it really trained


def test_zero_initialised_residual_branches_are_not_divided_by_zero() -> None:
    torch.manual_seed(0)
    model = zoo.residual_mlp()
    watch = gw.GradWatch(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        detectors=[gw.ExplodingDetector(), gw.VanishingDetector(patience=1)],
        log_every_n_steps=1,
    )
    x, y = zoo.regression_data()
    nn.functional.mse_loss(model(x), y).backward()
    assert model[1].fc1.weight.grad.abs().sum() == 0  # the branch input gets no gradient at step 0
    watch.step()
    watch.close()
    assert watch.alerts == []


# ----------------------------------------------------------------------------- exploding


def test_exploding_fires_at_step_0_on_an_rnn_with_spectral_radius_3() -> None:
    model = zoo.exploding_rnn(radius=3.0)
    x, _ = _sequence_data(seq_len=30)
    watch = gw.GradWatch(model, log_every_n_steps=1)
    model(x[:32]).pow(2).mean().backward()
    report = watch.step()
    watch.close()
    exploding = [a for a in report.alerts if a.kind is gw.AlertKind.EXPLODING]
    assert len(exploding) == 1 and exploding[0].step == 0
    assert exploding[0].layers[0] == "rnn" and exploding[0].value > exploding[0].threshold


def test_exploding_stays_quiet_on_a_well_conditioned_rnn() -> None:
    model = zoo.exploding_rnn(radius=0.9)
    x, y = _sequence_data(seq_len=30)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch, _ = _train(
        model, (x, y), nn.functional.mse_loss, steps=40, optimizer=optimizer, log_every_n_steps=10
    )
    assert "exploding" not in _kinds(watch)


# ----------------------------------------------------------------------------- spike


def test_spike_announces_a_learning_rate_divergence_before_the_loss_is_nan() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.ReLU, depth=4, width=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    raise_at = 60
    losses: list[float] = []
    x, y = zoo.regression_data()
    generator = torch.Generator().manual_seed(0)
    watch = gw.GradWatch(model, optimizer, detectors=[gw.SpikeDetector()], log_every_n_steps=5)
    for step in range(200):
        if step == raise_at:
            optimizer.param_groups[0]["lr"] = 3.0
        index = torch.randint(0, len(x), (32,), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[index]), y[index])
        loss.backward()
        watch.step(loss=loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    watch.close()
    first_nan = next(i for i, v in enumerate(losses) if not math.isfinite(v))
    spikes = [a for a in watch.alerts if a.kind is gw.AlertKind.SPIKE]
    assert spikes, f"no spike; loss became NaN at step {first_nan}"
    assert raise_at <= spikes[0].step < first_nan
    assert spikes[0].value >= gw.SpikeDetector().min_ratio and spikes[0].layers


def test_spike_ignores_invalid_steps_and_resumes_from_its_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    detector = gw.SpikeDetector(warmup=5)
    watch = gw.GradWatch(model, detectors=[detector], log_every_n_steps=1)
    x = torch.randn(64, 4)
    for step in range(12):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        if step == 8:  # a NaN step: left to the non-finite detector, out of the statistics
            model[0].weight.grad[0, 0] = float("nan")
        watch.step()
    assert _kinds(watch) == []
    state = detector.state_dict()
    assert all(math.isfinite(v) for v in state["mean"] + state["var"])
    assert state["count"][-1] == 11.0
    fresh = gw.SpikeDetector(warmup=5)
    restored = gw.GradWatch(model, detectors=[fresh], log_every_n_steps=1)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    restored.load_state_dict(watch.state_dict())
    restored.step()
    assert fresh.state_dict()["count"][-1] == 12.0
    model.zero_grad()
    (1e3 * model(x).pow(2).mean()).backward()  # a 1000x jump right after resuming
    restored.step()
    assert _kinds(restored) == ["spike"]
    watch.close()
    restored.close()


# ----------------------------------------------------------------------------- non-finite


class _Poisoned(nn.Module):
    """An MLP with a NaN-in-backward injector after layer ``at``."""

    def __init__(self, depth: int = 6, at: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))
        self.at = at
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = torch.tanh(layer(x))
            if self.poison and index == self.at:
                x = NaNInBackward.apply(x)
        return x.sum(1)


def test_nonfinite_names_the_deepest_nonfinite_layer_first() -> None:
    torch.manual_seed(0)
    model = _Poisoned(depth=6, at=3)
    watch = gw.GradWatch(model, log_every_n_steps=1)
    x = torch.randn(16, 8)
    model(x).pow(2).mean().backward()
    watch.step()
    assert watch.alerts == []
    model.zero_grad()
    model.poison = True
    model(x).pow(2).mean().backward()
    report = watch.step()
    watch.close()
    (alert,) = [a for a in report.alerts if a.kind is gw.AlertKind.NONFINITE]
    # The NaN enters the backward pass after layer 3: layers 0..3 are poisoned, 4 and 5 are fine.
    assert alert.layers == ("layers.3", "layers.2", "layers.1", "layers.0")
    assert alert.severity == "error" and alert.step == 1 and alert.value == gw.Origin.BACKWARD
    assert "origin: backward" in alert.message and "at layer layers.3 " in alert.message


def test_nonfinite_loss_fires_and_raise_policy_raises_gradient_error() -> None:
    model = nn.Linear(4, 1)
    watch = gw.GradWatch(model, log_every_n_steps=10)
    model(torch.randn(8, 4)).mean().backward()
    watch.step(loss=torch.tensor(float("inf")))
    watch.close()
    (alert,) = watch.alerts
    assert alert.kind is gw.AlertKind.NONFINITE and alert.layers == ()
    assert "origin: loss" in alert.message

    raising = gw.GradWatch(model, nonfinite="raise", log_every_n_steps=10)
    model.zero_grad()
    model(torch.randn(8, 4)).mean().backward()
    raising.step(loss=torch.tensor(1.0))
    model.zero_grad()
    model(torch.full((8, 4), float("nan"))).mean().backward()
    with pytest.raises(gw.GradientError) as caught:
        raising.step()
    assert caught.value.alert.kind is gw.AlertKind.NONFINITE
    assert caught.value.alert.layers == () and caught.value.alert.step == 1
    assert "origin: input" in caught.value.alert.message
    raising.close()


def test_nonfinite_stays_quiet_on_finite_training() -> None:
    torch.manual_seed(0)
    model = _Poisoned()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 8)
    watch, _ = _train(
        model,
        (x, torch.zeros(64)),
        nn.functional.mse_loss,
        steps=30,
        optimizer=optimizer,
        detectors=[gw.NonFiniteDetector()],
        log_every_n_steps=10,
    )
    assert watch.alerts == []


# ----------------------------------------------------------------------------- stagnation


def _two_group_model() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    return model, torch.optim.Adam(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 0.0},  # planted: a layer that never moves
            {"params": model[4].parameters()},
        ],
        lr=1e-3,
    )


def test_stagnation_fires_on_a_layer_with_zero_learning_rate() -> None:
    model, optimizer = _two_group_model()
    watch, _ = _train(
        model,
        zoo.regression_data(),
        nn.functional.mse_loss,
        steps=60,
        optimizer=optimizer,
        log_every_n_steps=10,
        track_updates=True,
    )
    stagnation = [a for a in watch.alerts if a.kind is gw.AlertKind.STAGNATION]
    assert len(stagnation) == 1 and stagnation[0].layers == ("2",)
    # Measurements at steps 9, 19, 29: fired at the third one.
    assert stagnation[0].step == 29 and stagnation[0].value == 0.0


def test_stagnation_stays_quiet_while_every_layer_learns() -> None:
    model, optimizer = _two_group_model()
    optimizer.param_groups[1]["lr"] = 1e-3
    watch, _ = _train(
        model,
        zoo.regression_data(),
        nn.functional.mse_loss,
        steps=60,
        optimizer=optimizer,
        log_every_n_steps=10,
        track_updates=True,
    )
    assert "stagnation" not in _kinds(watch)


# ----------------------------------------------------------------------------- zero gradient


def _dead_relu_mlp() -> nn.Sequential:
    """Three layers; the second ReLU never fires, so layers 0 and 2 get exactly zero gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    return model


def test_zero_gradients_are_reported_by_default_naming_the_layers() -> None:
    model = _dead_relu_mlp()
    watch, _ = _train(
        model,
        zoo.regression_data(),
        nn.functional.mse_loss,
        steps=200,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        log_every_n_steps=25,
    )
    zero = [a for a in watch.alerts if a.kind is gw.AlertKind.ZERO_GRAD]
    assert len(zero) == 1 and zero[0].step == gw.ZeroGradientDetector().patience - 1
    assert set(zero[0].layers) == {"0", "2"} and zero[0].severity == "warning"
    assert "exactly-zero gradient" in zero[0].message


def test_zero_gradients_of_layers_outside_the_optimizer_or_embeddings_are_not_reported() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "embedding": nn.Embedding(50, 16),
            "mlp": _dead_relu_mlp(),
        }
    )
    optimizer = torch.optim.Adam(
        [*model["embedding"].parameters(), *model["mlp"][4].parameters()], lr=1e-3
    )
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=20)
    x, y = zoo.regression_data()
    for _ in range(80):
        optimizer.zero_grad()
        hidden = model["embedding"](torch.zeros(len(x), dtype=torch.long)) * 0.0
        loss = nn.functional.mse_loss(model["mlp"](x + hidden), y)
        loss.backward()
        watch.step(loss=loss)
        optimizer.step()
    watch.close()
    assert [a.kind for a in watch.alerts] == []


def test_zero_gradient_run_ignores_invalid_steps_and_resets_when_it_moves() -> None:
    from tests import factories

    detector = gw.ZeroGradientDetector(patience=3)
    detector.bind(factories.layout((4, 4)))
    zero = [0.0, 1.0]
    first = detector.observe(factories.observation([zero, zero]))
    assert first.fired.tolist() == [False, False]
    nan_step = detector.observe(factories.observation([[0.0, math.nan]]))
    assert nan_step.fired.tolist() == [False]
    fired = detector.observe(factories.observation([zero, [1.0, 1.0], zero]))
    assert fired.fired.tolist() == [True, False, False]
    assert fired.scores is not None and fired.scores[0].tolist() == [3.0, 0.0]
    idle = detector.observe(factories.observation([zero], lr=[0.0, 1.0]))  # not updated
    assert idle.fired.tolist() == [False]


# ----------------------------------------------------------------------------- dead units


def test_a_relu_layer_dead_entirely_is_reported_within_20_steps_partial_death_after_50() -> None:
    model = _dead_relu_mlp()
    watch, _ = _train(
        model,
        zoo.regression_data(),
        nn.functional.mse_loss,
        steps=60,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
        detectors=[gw.DeadUnitsDetector()],
        check_activations=True,
        log_every_n_steps=10,
    )
    (alert,) = watch.alerts
    assert alert.step == 19 and alert.layers == ("3",) and alert.value == 1.0
    assert "every unit" in alert.message

    half = _dead_relu_mlp()
    with torch.no_grad():
        half[2].bias[:16] = 0.0  # half of the units live
    watch, _ = _train(
        half,
        zoo.regression_data(),
        nn.functional.mse_loss,
        steps=60,
        optimizer=torch.optim.SGD(half.parameters(), lr=1e-3),
        detectors=[gw.DeadUnitsDetector()],
        check_activations=True,
        log_every_n_steps=10,
    )
    (alert,) = watch.alerts
    assert alert.step == 49 and alert.layers == ("3",) and 0.5 <= alert.value < 1.0


# ----------------------------------------------------------------------------- spike thresholds


def test_spike_needs_10x_in_a_layer_3x_in_the_total_and_skips_layers_not_updated() -> None:
    from tests import factories

    detector = gw.SpikeDetector(warmup=5)
    detector.bind(factories.layout([4] * 64))
    generator = torch.Generator().manual_seed(0)
    lr = [0.1] * 63 + [0.0]  # the last layer is not updated

    def jump(layer: int, factor: float) -> list[float]:
        return [factor if index == layer else 1.0 for index in range(64)]

    for _ in range(20):
        noisy = (1.0 + 0.05 * torch.randn(64, generator=generator)).tolist()
        assert not detector.observe(factories.observation(noisy, lr=lr)).fired.any()
    # 20x in one of 64 layers moves the total 2.7x: only the layer rule can fire.
    assert not detector.observe(factories.observation(jump(1, 6.0), lr=lr)).fired.any()
    assert not detector.observe(factories.observation(jump(63, 20.0), lr=lr)).fired.any()
    layer = detector.observe(factories.observation(jump(1, 20.0), lr=lr))
    assert layer.fired.tolist() == [True]
    assert layer.scores is not None and layer.scores[0].argmax() == 1
    total = detector.observe(factories.observation([4.0] * 64, lr=lr))  # every layer 4x
    assert total.fired.tolist() == [True]


# ----------------------------------------------------------------------------- norm growth


@pytest.mark.parametrize(("factor", "fires"), [(1.0, False), (1.05, False), (1.3, True)])
def test_norm_growth_fires_on_a_steady_climb_that_the_spike_detector_follows(
    factor: float, fires: bool
) -> None:
    from tests import factories

    growth = gw.NormGrowthDetector()
    spike = gw.SpikeDetector()
    growth.bind(factories.layout([4] * 8))
    spike.bind(factories.layout([4] * 8))
    generator = torch.Generator().manual_seed(0)
    growth_steps: list[int] = []
    spiked = False
    for block in range(6):
        steps = list(range(20 * block, 20 * block + 20))
        rows = [
            ((1.0 + 0.1 * torch.randn(8, generator=generator)) * factor ** max(0, s - 60)).tolist()
            for s in steps
        ]
        detection = growth.observe(factories.observation(rows, steps=steps))
        growth_steps += [s for s, f in zip(steps, detection.fired.tolist(), strict=True) if f]
        spiked |= any(bool(spike.observe(factories.observation(row)).fired) for row in rows)
    assert not spiked  # the EMA follows a steady climb
    assert bool(growth_steps) is fires
    if fires:
        assert 60 < growth_steps[0] <= 80


def test_norm_growth_ignores_one_jump_and_invalid_steps() -> None:
    from tests import factories

    detector = gw.NormGrowthDetector(growth=30.0, window=4)
    detector.bind(factories.layout([4, 4]))
    jump = detector.observe(factories.observation([[1.0, 1.0]] * 6 + [[100.0, 100.0]] * 6))
    assert not jump.fired.any()  # 100x at once: only one half grew
    nan = detector.observe(factories.observation([[math.nan, 1.0]] * 4 + [[1e9, 1e9]]))
    assert not nan.fired.any()
