"""Demo scenarios: small models on built-in synthetic data that show each gradient pathology.

Each scenario trains for a few hundred steps on the CPU (seconds), streams to its own TensorBoard
run and ends with the watch's diagnosis:

- ``vanishing``: a deep sigmoid MLP with PyTorch's default initialisation;
- ``healthy``: the same depth with the textbook remedies (ReLU, He initialisation, LayerNorm,
  residual connections): the vanishing alert is gone;
- ``exploding``: an Elman RNN whose recurrent matrix has spectral radius well above 1;
- ``nan``: a healthy MLP whose input batch turns to NaN for one step midway (the update of that step
  is skipped).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import torch
from torch import nn

from gradwatch.cli import DEFAULT_STEPS, SCENARIOS
from gradwatch.engine.alerts import Alert
from gradwatch.engine.remedies import Remedy, SkipStep
from gradwatch.watch import GradWatch

_DEPTH = 16
_WIDTH = 32
_FEATURES = 16
_BATCH = 64


Batch = tuple[torch.Tensor, torch.Tensor]
Built = tuple[nn.Module, torch.optim.Optimizer, Callable[[int], Batch]]


@dataclass
class Scenario:
    """One demo: what it shows, how to build its model, data and optimizer.

    Attributes:
        name: Scenario name (also the TensorBoard run name).
        description: One line shown before training.
        build: ``(seed, steps) -> (model, optimizer, batch sampler)``; the sampler maps a step to
            ``(inputs, targets)``.
        remedies: Builds the remedies the watch applies.
    """

    name: str
    description: str
    build: Callable[[int, int], Built]
    remedies: Callable[[], list[Remedy]]


@dataclass
class DemoResult:
    """What one scenario produced.

    Attributes:
        name: Scenario name.
        logdir: Its TensorBoard run directory.
        alerts: Every alert raised.
        diagnosis: ``watch.summary()`` (or the alerts, one per line).
        final_loss: Loss of the last step.
    """

    name: str
    logdir: str
    alerts: list[Alert]
    diagnosis: str
    final_loss: float


def regression_task(
    n: int = 512, features: int = _FEATURES, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic regression task: ``y = sin(x @ w) + noise``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, 1, generator=generator) / math.sqrt(features)
    y = torch.sin(3.0 * x @ w) + 0.05 * torch.randn(n, 1, generator=generator)
    return x, y


def sequence_task(
    n: int = 256, length: int = 40, features: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic sequence task: predict the mean of the first feature over time."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=generator)
    return x, x[:, :, :1].mean(dim=1)


def _sampler(x: torch.Tensor, y: torch.Tensor, seed: int) -> Callable[[int], Batch]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    batches = len(x) // _BATCH

    def sample(step: int) -> Batch:
        index = order[(step % batches) * _BATCH : (step % batches + 1) * _BATCH]
        return x[index], y[index]

    return sample


def plain_mlp(
    activation: type[nn.Module], depth: int = _DEPTH, width: int = _WIDTH, features: int = _FEATURES
) -> nn.Sequential:
    """A plain MLP with PyTorch's default initialisation (sigmoid/tanh: vanishing gradients)."""
    layers: list[nn.Module] = []
    size = features
    for _ in range(depth - 1):
        layers += [nn.Linear(size, width), activation()]
        size = width
    layers.append(nn.Linear(size, 1))
    return nn.Sequential(*layers)


class _ResidualBlock(nn.Module):
    """``x + Linear(ReLU(LayerNorm(x)))`` with He initialisation."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(torch.relu(self.norm(x)))


def _healthy_mlp() -> nn.Sequential:
    stem = nn.Linear(_FEATURES, _WIDTH)
    nn.init.kaiming_normal_(stem.weight, nonlinearity="relu")
    blocks = [_ResidualBlock(_WIDTH) for _ in range(_DEPTH - 2)]
    return nn.Sequential(stem, *blocks, nn.LayerNorm(_WIDTH), nn.Linear(_WIDTH, 1))


class ElmanRegressor(nn.Module):
    """An Elman (tanh) RNN reading ``[batch, time, features]`` and a linear head on its last state;
    the recurrent matrix is ``radius`` times an orthogonal one (every eigenvalue has modulus
    ``radius``: above 1, gradients explode through time)."""

    def __init__(self, features: int = 8, hidden: int = 32, radius: float = 1.0) -> None:
        super().__init__()
        self.rnn = nn.RNN(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
        with torch.no_grad():
            self.rnn.get_parameter("weight_hh_l0").copy_(radius * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _vanishing(seed: int, steps: int) -> Built:
    torch.manual_seed(seed)
    model = plain_mlp(nn.Sigmoid)
    x, y = regression_task(seed=seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), _sampler(x, y, seed)


def _healthy(seed: int, steps: int) -> Built:
    torch.manual_seed(seed)
    model = _healthy_mlp()
    x, y = regression_task(seed=seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), _sampler(x, y, seed)


def _exploding(seed: int, steps: int) -> Built:
    torch.manual_seed(seed)
    model = ElmanRegressor(radius=3.0)
    x, y = sequence_task(seed=seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), _sampler(x, y, seed)


def _nan(seed: int, steps: int) -> Built:
    torch.manual_seed(seed)
    model = _healthy_mlp()
    x, y = regression_task(seed=seed)
    sample = _sampler(x, y, seed)
    poisoned_step = steps // 2

    def poisoned(step: int) -> Batch:
        inputs, targets = sample(step)
        if step == poisoned_step:
            inputs = inputs.clone()
            inputs[0, 0] = float("nan")
        return inputs, targets

    return model, torch.optim.SGD(model.parameters(), lr=0.01), poisoned


def _skip_nonfinite() -> list[Remedy]:
    return [SkipStep()]


SCENARIO_SPECS = {
    "vanishing": Scenario(
        "vanishing",
        f"{_DEPTH}-layer sigmoid MLP, default init: early layers should barely learn",
        _vanishing,
        list,
    ),
    "healthy": Scenario(
        "healthy",
        "the same depth with ReLU, He init, LayerNorm and residual connections",
        _healthy,
        list,
    ),
    "exploding": Scenario(
        "exploding",
        "Elman RNN over 40 time steps, recurrent spectral radius 3: gradients blow up",
        _exploding,
        list,
    ),
    "nan": Scenario(
        "nan",
        "healthy MLP, one NaN in the input batch halfway (that update is skipped)",
        _nan,
        _skip_nonfinite,
    ),
}


def run_scenario(
    name: str,
    logdir: str | os.PathLike[str],
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    out: TextIO = sys.stdout,
) -> DemoResult:
    """Trains one scenario, streaming to ``logdir/<name>``, and returns its diagnosis.

    Args:
        name: One of :data:`SCENARIOS`.
        logdir: Parent directory of the TensorBoard runs.
        steps: Optimizer steps.
        seed: Seed of the model initialisation and the data.
        out: Where progress goes.

    Raises:
        ValueError: Unknown scenario or ``steps < 1``.
    """
    if name not in SCENARIO_SPECS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {name!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    spec = SCENARIO_SPECS[name]
    run_dir = os.path.join(os.fspath(logdir), name)
    model, optimizer, sample = spec.build(seed, steps)
    log_every = max(1, min(10, steps // 10))
    print(f"[{name}] {spec.description}", file=out, flush=True)
    loss_value = float("nan")
    with GradWatch(
        model,
        optimizer,
        logdir=run_dir,
        log_every_n_steps=log_every,
        histogram_every_n_steps=max(log_every, steps // 10),
        remedies=spec.remedies(),
        track_updates=True,
    ) as watch:
        progress = _Progress(name, steps, out)
        for step in range(steps):
            inputs, targets = sample(step)
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            report = watch.step(loss=loss)
            if not report.skipped:
                optimizer.step()
            optimizer.zero_grad()
            if progress.due(step):
                loss_value = float(loss.detach())  # a host sync, a few times per run
                progress.show(step, loss_value, len(watch.alerts))
        alerts = watch.alerts
        diagnosis = watch.summary()
    return DemoResult(name, run_dir, alerts, diagnosis, loss_value)


class _Progress:
    """Progress lines: a bar redrawn in place on a terminal, every quarter otherwise."""

    def __init__(self, name: str, steps: int, out: TextIO) -> None:
        self.name = name
        self.steps = steps
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.every = max(1, steps // (50 if self.tty else 4))

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0 or step + 1 == self.steps

    def show(self, step: int, loss: float, alerts: int) -> None:
        done = (step + 1) / self.steps
        bar = "#" * round(24 * done) + "." * (24 - round(24 * done))
        line = f"  [{bar}] step {step + 1}/{self.steps}  loss {loss:.4g}  alerts {alerts}"
        if self.tty:
            end = "\n" if step + 1 == self.steps else ""
            print("\r" + line, end=end, file=self.out, flush=True)
        else:
            print(line, file=self.out, flush=True)
