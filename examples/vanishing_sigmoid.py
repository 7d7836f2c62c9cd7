"""Vanishing gradients in a deep sigmoid network, and the same network fixed.

A 20-layer MLP with sigmoid activations and PyTorch's default initialisation passes gradients
backwards through 19 sigmoids whose slope is at most 1/4: by the first layer they are orders of
magnitude smaller than at the last, so the early layers barely learn. gradwatch raises a VANISHING
alert naming the first layers, with advice chosen for this model (it has Sigmoid layers and no
normalisation).

The fixed network keeps the depth and width but uses ReLU, He (Kaiming) initialisation,
BatchNorm and residual connections; its first and last layers get gradients of the same order and
no vanishing alert fires.

Look at: the "first/last layer gradient ratio" line of each run, the alerts and their advice.

Run:
    python examples/vanishing_sigmoid.py [--steps 60] [--logdir runs/vanishing]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import gradwatch as gw

DEPTH, WIDTH, D_IN = 20, 32, 16


def sigmoid_mlp() -> nn.Sequential:
    """20 Linear layers with a Sigmoid after each but the last, default initialisation."""
    layers: list[nn.Module] = []
    for index in range(DEPTH - 1):
        layers += [nn.Linear(D_IN if index == 0 else WIDTH, WIDTH), nn.Sigmoid()]
    layers.append(nn.Linear(WIDTH, 1))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``x + ReLU(BatchNorm(Linear(x)))`` with a He-initialised Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.linear(x)))


def fixed_mlp() -> nn.Sequential:
    """Same depth and width: ReLU, He initialisation, BatchNorm, residual connections."""
    stem = nn.Linear(D_IN, WIDTH)
    nn.init.kaiming_normal_(stem.weight, nonlinearity="relu")
    return nn.Sequential(
        stem,
        *[ResidualBlock(WIDTH) for _ in range(DEPTH - 2)],
        nn.BatchNorm1d(WIDTH),  # the residual sum grows with depth: normalise it for the head
        nn.Linear(WIDTH, 1),
    )


def train(name: str, model: nn.Module, steps: int, logdir: Path) -> None:
    """Trains ``model`` on a synthetic regression and prints what gradwatch saw."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    true_weights = torch.randn(D_IN, 1)
    with gw.GradWatch(model, optimizer, logdir=logdir / name, log_every_n_steps=20) as watch:
        for _ in range(steps):
            inputs = torch.randn(64, D_IN)
            loss = nn.functional.mse_loss(model(inputs), torch.tanh(inputs @ true_weights))
            loss.backward()
            if not watch.step(loss=loss).skipped:
                optimizer.step()
            optimizer.zero_grad()
        norms = watch.last_norms()
        names = watch.layer_names
        first, last = norms[names[0]], norms[names[-1]]
        print(f"=== {name}: {len(names)} layers, final loss {loss.item():.4f}")
        print(
            f"first layer '{names[0]}' gradient norm {first:.2e}, last layer '{names[-1]}' "
            f"{last:.2e}: first/last layer gradient ratio {first / last:.1e}"
        )
        vanishing = [a for a in watch.alerts if a.kind is gw.AlertKind.VANISHING]
        if not vanishing:
            print("no vanishing-gradient alert")
        for alert in vanishing:
            print(f"ALERT at step {alert.step}: {alert.message}")
            print(f"  layers: {', '.join(alert.layers[:5])}")
            for advice in alert.advice:
                print(f"  advice: {advice}")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per network")
    parser.add_argument("--logdir", type=Path, default=Path("runs/vanishing"))
    args = parser.parse_args()
    torch.manual_seed(0)
    train("sigmoid", sigmoid_mlp(), args.steps, args.logdir)
    torch.manual_seed(0)
    train("fixed", fixed_mlp(), args.steps, args.logdir)
    print(f"TensorBoard: tensorboard --logdir {args.logdir}  (gradwatch/gradient_flow shows both)")


if __name__ == "__main__":
    main()
