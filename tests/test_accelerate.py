"""gradwatch in plain Accelerate loops, and optimizer wrappers looked through by rule."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.optimizer import owns_step_hooks, unwrap_optimizer

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

MICRO_BATCHES = 16


@pytest.fixture(autouse=True)
def _fresh_accelerator_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons (the mixed precision cannot change once set)."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _setup(
    accumulation: int = 1, mixed_precision: str = "no", seed: int = 0
) -> tuple[Any, nn.Module, Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    accelerator = accelerate.Accelerator(
        cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation
    )
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, targets = torch.randn(MICRO_BATCHES, 8, 8), torch.randn(MICRO_BATCHES, 8, 1)
    batches = list(zip(inputs, targets, strict=True))
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, batches


def _train(
    watch_mode: str | None,
    accumulation: int = 1,
    clip: float | None = None,
    mixed_precision: str = "no",
    remedies: tuple[gw.Remedy, ...] = (),
    spike_at: int | None = None,
    detectors: str | list[gw.Detector] = "default",
) -> dict[str, Any]:
    """The Accelerate loop of the docs; ``watch_mode``: None, ``"step"`` or ``"attach"``."""
    accelerator, model, optimizer, batches = _setup(accumulation, mixed_precision)
    watch = None
    if watch_mode is not None:
        watch = gw.GradWatch(
            model, optimizer, log_every_n_steps=4, remedies=list(remedies), detectors=detectors
        )
        if watch_mode == "attach":
            watch.attach()
    pre_clip_norms, learning_rates = [], []
    for index, (x, y) in enumerate(batches):
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            if index // accumulation == spike_at:
                loss = loss * 1e4
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if watch_mode == "step":
                    watch.step(loss)  # raw gradients, once per update, before the clipping
                if clip is not None:
                    norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                    pre_clip_norms.append(float(norm))
            optimizer.step()
            learning_rates.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
    if watch is not None:
        watch.close()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "pre_clip_norms": pre_clip_norms,
        "learning_rates": learning_rates,
        "watch": watch,
        "optimizer": optimizer,
    }


def _totals(watch: gw.GradWatch) -> list[float]:
    history = watch.history()
    squares = sum(history[name].astype("float64") ** 2 for name in watch.layer_names)
    return [float(v) for v in squares**0.5]


def test_the_accelerated_optimizer_is_looked_through() -> None:
    _, model, optimizer, _ = _setup()
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    assert not owns_step_hooks(optimizer)
    watch = gw.GradWatch(model, optimizer)
    assert watch.optimizer is optimizer.optimizer
    watch.close()


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_explicit_step_records_the_raw_norms_that_clip_grad_norm_returns(
    mixed_precision: str,
) -> None:
    baseline = _train(None, accumulation=2, clip=1.0, mixed_precision=mixed_precision)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    watched = _train("step", accumulation=2, clip=1.0, mixed_precision=mixed_precision)

    watch = watched["watch"]
    assert watch.history()["step"].tolist() == list(range(MICRO_BATCHES // 2))  # one per update
    norms = watched["pre_clip_norms"]
    assert max(norms) > 1.0  # the user's clipping acted
    assert _totals(watch) == pytest.approx(norms, rel=1e-5)
    for before, after in zip(baseline["params"], watched["params"], strict=True):
        assert torch.equal(before, after)  # gradwatch changed nothing in the run


def test_attach_steps_only_on_the_updates_of_gradient_accumulation() -> None:
    baseline = _train(None, accumulation=2)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = _train("attach", accumulation=2)

    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert watched["watch"].step_count == MICRO_BATCHES // 2
    for before, after in zip(baseline["params"], watched["params"], strict=True):
        assert torch.equal(before, after)


def test_lr_backoff_works_on_the_accelerated_optimizer() -> None:
    backoff = gw.LRBackoff(factor=0.5, on=("spike", "exploding"))
    # Under AdamW a 1e4x loss is no overshooting update (EXPLODING stays quiet): the spike fires.
    result = _train(
        "attach", remedies=(backoff,), spike_at=10, detectors=[gw.SpikeDetector(warmup=5)]
    )

    watch = result["watch"]
    assert watch.step_count == MICRO_BATCHES  # every step recorded (none lost to an error)
    scales = watch.engine.history.host_lr_scale.tolist()
    assert min(scales) == pytest.approx(0.5)
    assert scales[:10] == [1.0] * 10
    assert result["learning_rates"] == [pytest.approx(1e-2)] * MICRO_BATCHES  # stored lr intact


def test_skip_step_leaves_the_parameters_of_a_nan_update_untouched() -> None:
    accelerator, model, optimizer, batches = _setup()
    skip = gw.SkipStep(on=("nonfinite",))
    watch = gw.GradWatch(model, optimizer, remedies=[skip], log_every_n_steps=4).attach()
    for index, (x, y) in enumerate(batches[:8]):
        loss = nn.functional.mse_loss(model(x), y) * (float("nan") if index == 5 else 1.0)
        accelerator.backward(loss)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        after = list(model.parameters())
        changed = not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert changed == (index != 5)
        optimizer.zero_grad()
    watch.close()
    assert watch.step_count == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- wrappers by rule


class _Forwarding(torch.optim.Optimizer):
    """A wrapper that, like ``AcceleratedOptimizer``, never runs ``Optimizer.__init__``."""

    def __init__(self, inner: torch.optim.Optimizer, attribute: str) -> None:
        setattr(self, attribute, inner)
        self.param_groups = inner.param_groups


class _Holding(torch.optim.Optimizer):
    """A real optimizer that holds another one (as ``ZeroRedundancyOptimizer`` holds ``optim``)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__(inner.param_groups[0]["params"], {"lr": 0.1})
        self.optim = inner


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)


@pytest.mark.parametrize("attribute", ["optimizer", "optim", "_optimizer"])
def test_wrappers_without_step_hooks_are_looked_through(attribute: str) -> None:
    inner = _sgd()
    assert unwrap_optimizer(_Forwarding(_Forwarding(inner, attribute), "optimizer")) is inner


def test_an_optimizer_that_owns_its_hooks_is_kept() -> None:
    holding = _Holding(_sgd())
    assert unwrap_optimizer(holding) is holding


def test_an_optimizer_without_step_hooks_fails_at_construction_when_they_are_needed() -> None:
    model = nn.Linear(2, 1)
    hookless = _Forwarding(torch.optim.SGD(model.parameters(), lr=0.1), "inner")
    gw.GradWatch(model, hookless).close()  # watching alone needs no hook
    with pytest.raises(TypeError, match=r"LRBackoff .* _Forwarding has none"):
        gw.GradWatch(model, hookless, remedies=[gw.LRBackoff()])
    with pytest.raises(TypeError, match=r"attach\(\) .* _Forwarding has none"):
        gw.GradWatch(model, hookless).attach()
