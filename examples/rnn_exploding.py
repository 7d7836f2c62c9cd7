"""Exploding gradients in a recurrent network, rescued by gradient clipping.

An Elman RNN (tanh) whose recurrent matrix has spectral radius 3 multiplies the gradient by up to
3 at every one of its 40 time steps on the way back. Trained with plain SGD, the first update
overshoots, the loss climbs past 1e30 and then turns into NaN. gradwatch raises EXPLODING at
step 0 (the gradient is many times the size of the weights), then NONFINITE where the NaN starts.

The same run with the `gw.ClipNorm(max_norm=1.0)` remedy reuses the norms gradwatch already
computed to rescale the gradients on the device (no host sync): every update has norm at most
0.1 (lr x max_norm), and the loss stays finite, near its starting value, for the whole run.

Look at: the loss every 10 steps of both runs, the alerts, and the clip coefficient
(`report.clip_coef`: 1.0 means no clipping) of the rescued run.

Run:
    python examples/rnn_exploding.py [--steps 60]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch as gw

HIDDEN, FEATURES, SEQUENCE = 32, 4, 40


class Regressor(nn.Module):
    """Elman RNN over ``[batch, time, features]`` and a linear head on the last hidden state."""

    def __init__(self, spectral_radius: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)
        with torch.no_grad():  # an orthogonal matrix times the radius: every singular value is it
            orthogonal, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN))
            self.rnn.weight_hh_l0.copy_(spectral_radius * orthogonal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.rnn(x)
        return self.head(outputs[:, -1])


def train(name: str, remedies: list[gw.Remedy], steps: int) -> None:
    """Trains the RNN with SGD and prints the loss, the alerts and the clipping."""
    torch.manual_seed(0)
    model = Regressor(spectral_radius=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    print(f"=== {name}")
    with gw.GradWatch(
        model, optimizer, remedies=remedies, log_every_n_steps=10, on_alert=lambda alert: None
    ) as watch:
        for step in range(steps):
            inputs = 0.5 * torch.randn(32, SEQUENCE, FEATURES)
            targets = inputs[:, -1, :1]  # learnable: the last input's first feature
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            report = watch.step(loss=loss)
            if not report.skipped:
                optimizer.step()
            optimizer.zero_grad()
            if step % 10 == 0 or step == steps - 1:
                clip = (
                    "" if report.clip_coef is None else f", clip coef {report.clip_coef.item():.1e}"
                )
                print(
                    f"step {step:3d}: loss {loss.item():.3e}, gradient norm "
                    f"{report.total_norm.item():.2e}{clip}"
                )
        for alert in watch.alerts:
            print(f"ALERT {alert.kind.value} at step {alert.step}: {alert.message}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    args = parser.parse_args()
    train("no clipping: the loss explodes", [], args.steps)
    train("gw.ClipNorm(max_norm=1.0): rescued", [gw.ClipNorm(max_norm=1.0)], args.steps)


if __name__ == "__main__":
    main()
