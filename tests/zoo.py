"""Small models shared by the tests: healthy ones that stay quiet, pathological ones that fire."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.demo import ElmanRegressor, plain_mlp


def deep_mlp(
    activation: type[nn.Module], depth: int = 20, width: int = 32, d_in: int = 16
) -> nn.Sequential:
    """A plain MLP with PyTorch's default initialisation (sigmoid/tanh: vanishing)."""
    return plain_mlp(activation, depth, width, d_in)


def relu_he_bn_mlp(depth: int = 20, width: int = 32, d_in: int = 16) -> nn.Sequential:
    """Healthy: ReLU + He init + BatchNorm."""
    layers: list[nn.Module] = []
    dim = d_in
    for _ in range(depth - 1):
        linear = nn.Linear(dim, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.BatchNorm1d(width), nn.ReLU()]
        dim = width
    layers.append(nn.Linear(dim, 1))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Pre-LayerNorm residual MLP block whose branch output layer is zero-initialised."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def residual_mlp(depth: int = 12, width: int = 32, d_in: int = 16) -> nn.Sequential:
    """Healthy: pre-LN residual MLP with zero-initialised branches."""
    return nn.Sequential(
        nn.Linear(d_in, width),
        *[ResidualBlock(width) for _ in range(depth)],
        nn.LayerNorm(width),
        nn.Linear(width, 1),
    )


def small_cnn(channels: int = 8, classes: int = 10) -> nn.Sequential:
    """Healthy: a small CNN with BatchNorm, for 1x16x16 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1, stride=2),
        nn.BatchNorm2d(2 * channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, classes),
    )


class SequenceRegressor(nn.Module):
    """A recurrent model (LSTM, GRU or Elman RNN) reading ``[batch, time, features]``."""

    def __init__(self, cell: str = "LSTM", d_in: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def exploding_rnn(
    radius: float = 3.0, d_in: int = 8, hidden: int = 32, seed: int = 0
) -> ElmanRegressor:
    """An Elman (tanh) RNN whose recurrent matrix has spectral radius ``radius``."""
    torch.manual_seed(seed)
    return ElmanRegressor(d_in, hidden, radius)


def regression_data(
    n: int = 256, d_in: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic regression task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def wide_gelu_mlp(width: int = 1024, d_in: int = 16, seed: int = 0) -> nn.Sequential:
    """One wide GELU hidden layer.

    With SGD(lr=0.5, momentum=0.9) on ``regression_data`` (full batch) its loss turns inf/NaN within
    about 5 steps; the same net trains fine at lr=0.05.
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, 1))
