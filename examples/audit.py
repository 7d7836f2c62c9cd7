"""Pre-flight audit, then the diagnosis after a short run.

1. ``gw.audit`` runs one forward/backward on an example batch and warns that a 30-layer Tanh MLP
   will starve its first layers, before any training happens.
2. The fixed network (ReLU, He initialisation, BatchNorm) passes the same audit.
3. Training the Tanh network anyway under a ``GradWatch`` gives the same diagnosis from the
   runtime detectors: ``watch.summary()`` lists the worst layers, the alerts and the advice.

Run: ``python examples/audit.py [--steps 60]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch as gw

DEPTH, WIDTH, D_IN = 30, 32, 16


def tanh_mlp() -> nn.Sequential:
    """30 Linear + Tanh layers with PyTorch's default initialisation."""
    layers: list[nn.Module] = []
    for index in range(DEPTH - 1):
        layers += [nn.Linear(D_IN if index == 0 else WIDTH, WIDTH), nn.Tanh()]
    layers.append(nn.Linear(WIDTH, 1))
    return nn.Sequential(*layers)


def fixed_mlp() -> nn.Sequential:
    """The same depth with ReLU, He (Kaiming) initialisation and BatchNorm."""
    layers: list[nn.Module] = []
    for index in range(DEPTH - 1):
        linear = nn.Linear(D_IN if index == 0 else WIDTH, WIDTH)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.BatchNorm1d(WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, 1))
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps after the audit")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(256, D_IN)
    y = torch.sin(x @ torch.randn(D_IN, 1))

    model = tanh_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    print(gw.audit(model, x[:64], loss_fn=lambda out: nn.functional.mse_loss(out, y[:64])))
    print()
    print(gw.audit(fixed_mlp(), x[:64]))
    print()

    with gw.GradWatch(model, optimizer, log_every_n_steps=20) as watch:
        for _ in range(args.steps):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            watch.step(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
        print(watch.summary())


if __name__ == "__main__":
    main()
