"""Mixed precision: autocast + GradScaler, with gradwatch telling overflow steps from real NaNs.

With float16 autocast, a `torch.amp.GradScaler` multiplies the loss by a large scale so that small
gradients survive float16; when the scaled gradients overflow to Inf it skips that update and
halves the scale. Those steps are expected, not a sign of divergence. Given `scaler=scaler`,
gradwatch counts them as one AMP_OVERFLOW alert (severity "info") and keeps them out of every
statistic: no NONFINITE or SPIKE alert for them. The scale here starts deliberately high (2**32),
so the scaler backs off over the first steps before training settles.

Order of calls: `scaler.scale(loss).backward()`, `scaler.unscale_(optimizer)` (so gradwatch sees
the true gradients), `watch.step(loss=loss)`, `scaler.step(optimizer)`, `scaler.update()`.

Look at: the scale falling then settling, the single info alert, and the last gradient norms.

Run:
    python examples/amp_gradscaler.py [--steps 60] [--logdir runs/amp]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch as gw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--logdir", default="runs/amp", help="TensorBoard run directory")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**32)
    true_weights = torch.randn(32, 1)

    with gw.GradWatch(
        model, optimizer, scaler=scaler, logdir=args.logdir, log_every_n_steps=10
    ) as watch:
        for step in range(args.steps):
            inputs = torch.randn(64, 32)
            with torch.autocast("cpu", dtype=torch.float16):
                outputs = model(inputs)
            loss = nn.functional.mse_loss(outputs.float(), inputs @ true_weights)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            watch.step(loss=loss)
            scaler.step(optimizer)  # skips the update itself when the gradients overflowed
            scaler.update()
            optimizer.zero_grad()
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step:3d}: loss {loss.item():.4f}, scale {scaler.get_scale():.3g}")
        print()
        for alert in watch.alerts:
            print(
                f"ALERT {alert.kind.value} ({alert.severity}) at step {alert.step}: {alert.message}"
            )
        kinds = {alert.kind for alert in watch.alerts}
        print(
            "overflow steps reported as NaN/spike?",
            "yes" if kinds & {gw.AlertKind.NONFINITE, gw.AlertKind.SPIKE} else "no",
        )
        print("last gradient norms:", {k: round(v, 4) for k, v in watch.last_norms().items()})


if __name__ == "__main__":
    main()
