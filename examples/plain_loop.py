"""The plain PyTorch loop: watch per-layer gradient norms and stream them to TensorBoard.

Shows the three lines gradwatch adds to an ordinary training loop (`GradWatch(...)`,
`watch.step(loss=loss)` between `backward()` and `optimizer.step()`, `close()` through the `with`
block) on a small MLP regression with synthetic data, then what you can read back: the layers in
forward order, the latest per-layer norms, the history window and the diagnosis.

Run:
    python examples/plain_loop.py [--steps 200] [--logdir runs/plain_loop]
    tensorboard --logdir runs/plain_loop      # gradwatch/grad_norm/<layer>, gradient_flow, ...
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch as gw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--logdir", default="runs/plain_loop", help="TensorBoard run directory")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    true_weights = torch.randn(16, 1)

    with gw.GradWatch(model, optimizer, logdir=args.logdir, log_every_n_steps=20) as watch:
        for step in range(args.steps):
            inputs = torch.randn(32, 16)
            targets = inputs @ true_weights + 0.1 * torch.randn(32, 1)
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            report = watch.step(loss=loss)  # after backward, before optimizer.step()
            if not report.skipped:
                optimizer.step()
            optimizer.zero_grad()
            for alert in report.alerts:  # alerts materialise at flushes (every 20 steps here)
                print(f"step {step}: {alert.kind.value}: {alert.message}")

        print("layers (forward order):", watch.layer_names)
        print("latest gradient norm per layer:")
        for name, norm in watch.last_norms().items():
            print(f"  {name:>4}: {norm:.4f}")
        history = watch.history()
        print(
            f"history window: {len(history['step'])} steps, from {history['step'][0]} to "
            f"{history['step'][-1]}"
        )
        print(f"final loss: {loss.item():.4f}")
        print()
        print(watch.summary())
    print(f"\nLook at TensorBoard: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
