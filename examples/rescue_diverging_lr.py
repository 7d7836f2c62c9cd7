"""Rescue a run whose learning rate is far too high, with gradwatch remedies.

The same MLP (one 1024-wide GELU layer) is trained twice with ``SGD(lr=0.5, momentum=0.9)`` on a
small regression task (full batch). Without help its loss turns inf/NaN within a handful of steps.
With ``[AutoClip(), LRBackoff(), SkipStep(on=("nonfinite", "spike"))]`` gradwatch clips the
overshooting updates, lowers the learning rate when the gradients explode and climbs back once the
run is healthy: every loss stays finite and the run ends far below its starting loss.

Usage::

    python examples/rescue_diverging_lr.py --steps 300 --logdir runs/rescue --plot docs/rescue.png
    tensorboard --logdir runs/rescue   # gradwatch/clip_coef, gradwatch/lr_scale, alerts, ...
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

import gradwatch as gw

LEARNING_RATE = 0.5
MOMENTUM = 0.9


@dataclass
class Run:
    """What one training run left behind."""

    name: str
    losses: list[float] = field(default_factory=list)
    lr_scales: list[float] = field(default_factory=list)
    clipped_steps: int = 0
    skipped_steps: int = 0
    alerts: list[gw.Alert] = field(default_factory=list)

    @property
    def first_nonfinite(self) -> int | None:
        """Step of the first inf/NaN loss, or None."""
        return next((i for i, loss in enumerate(self.losses) if not math.isfinite(loss)), None)


def regression_data(
    n: int = 256, d_in: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic regression task: ``y = sin(x @ w) + noise``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator)
    w = torch.randn(d_in, 1, generator=generator)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def make_model(d_in: int = 16, width: int = 1024, seed: int = 0) -> nn.Module:
    """The MLP: far too wide for lr=0.5 with momentum 0.9 (it trains well at lr=0.05)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, 1))


def train(
    name: str, steps: int, remedies: list[gw.Remedy], logdir: str | None, seed: int = 0
) -> Run:
    """Trains for ``steps`` steps (stopping at the first inf/NaN loss when there is no remedy)."""
    x, y = regression_data()
    model = make_model(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    run = Run(name)
    clip_coefs = []
    run_dir = os.path.join(logdir, name) if logdir else None
    with gw.GradWatch(
        model, optimizer, logdir=run_dir, remedies=remedies, log_every_n_steps=25
    ) as watch:
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            report = watch.step(loss=loss)
            if not report.skipped:
                optimizer.step()
            run.losses.append(loss.item())  # the example prints every loss; a real loop need not
            run.lr_scales.append(report.lr_scale)
            run.skipped_steps += report.skipped
            if report.clip_coef is not None:
                clip_coefs.append(report.clip_coef)
            if not remedies and not math.isfinite(run.losses[-1]):
                break  # nothing will bring this run back
    run.clipped_steps = int((torch.stack(clip_coefs) < 0.999).sum()) if clip_coefs else 0
    run.alerts = watch.alerts
    return run


def describe(run: Run) -> str:
    """One paragraph: loss trajectory and what the remedies did."""
    checkpoints = [
        s for s in (0, 1, 2, 3, 5, 10, 25, 50, 100, 200, 300, 500) if s < len(run.losses)
    ]
    trajectory = ", ".join(f"{s}: {run.losses[s]:.3g}" for s in checkpoints)
    lines = [f"{run.name}: loss by step {{{trajectory}}}"]
    nonfinite = run.first_nonfinite
    if nonfinite is not None:
        lines.append(f"  loss turned {run.losses[nonfinite]} at step {nonfinite}: the run is lost")
    else:
        final = run.losses[-1]
        lines.append(
            f"  {len(run.losses)} steps, every loss finite; {run.losses[0]:.3g} -> {final:.3g} "
            f"({run.losses[0] / max(final, 1e-30):.0f}x lower)"
        )
    if run.name == "rescued":
        lines.append(
            f"  clipped steps: {run.clipped_steps}, skipped steps: {run.skipped_steps}, "
            f"lowest lr scale: {min(run.lr_scales):.3g}, final lr scale: {run.lr_scales[-1]:.3g}"
        )
    kinds = sorted({alert.kind.value for alert in run.alerts})
    lines.append(f"  alerts: {', '.join(kinds) if kinds else 'none'}")
    return "\n".join(lines)


def plot(runs: list[Run], path: str) -> None:
    """Renders both loss curves (log scale) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6), dpi=120)
    colors = {"unrescued": "tab:red", "rescued": "tab:blue"}
    for run in runs:
        finite = [loss if math.isfinite(loss) else math.nan for loss in run.losses]
        label = {
            "unrescued": "SGD lr=0.5, momentum=0.9",
            "rescued": "same + AutoClip, LRBackoff, SkipStep",
        }[run.name]
        axis.plot(range(len(finite)), finite, color=colors[run.name], label=label)
        nonfinite = run.first_nonfinite
        if nonfinite is not None:
            last = max((s for s in range(nonfinite) if math.isfinite(run.losses[s])), default=0)
            axis.plot([last], [run.losses[last]], "x", color=colors[run.name], markersize=9)
            axis.annotate(
                f"inf/NaN at step {nonfinite}",
                (last, run.losses[last]),
                textcoords="offset points",
                xytext=(8, -4),
                color=colors[run.name],
            )
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (MSE)")
    axis.set_title("gradwatch rescues a diverging learning rate")
    axis.legend(loc="upper right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def remedies() -> list[gw.Remedy]:
    """The three remedies of the rescue."""
    return [gw.AutoClip(), gw.LRBackoff(), gw.SkipStep(on=("nonfinite", "spike"))]


def over_seeds(steps: int, seeds: int) -> str:
    """Trains the rescued run for ``seeds`` initialisations; one line with the range of outcomes.

    A run this far past its stable learning rate is chaotic: its final loss depends on the seed,
    the CPU and the thread count, so only a range over seeds is a figure anyone can reproduce.
    """
    runs = [train("rescued", steps, remedies(), None, seed=seed) for seed in range(seeds)]
    finite = sum(run.first_nonfinite is None for run in runs)
    gains = sorted(run.losses[0] / max(run.losses[-1], 1e-30) for run in runs)
    median = (
        gains[len(gains) // 2]
        if len(gains) % 2
        else (gains[len(gains) // 2 - 1] * gains[len(gains) // 2]) ** 0.5
    )
    return (
        f"over seeds 0-{seeds - 1}: every loss finite in {finite}/{seeds} runs; final loss "
        f"{gains[0]:.3g}x to {gains[-1]:.3g}x lower than the first (median {median:.3g}x)"
    )


def main(argv: list[str] | None = None) -> list[Run]:
    """Runs both trainings, prints their summaries, optionally plots them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--logdir", default=None, help="TensorBoard directory for both runs")
    parser.add_argument("--plot", default=None, help="save the loss curves to this image file")
    parser.add_argument(
        "--seeds", type=int, default=1, help="also report the rescued run over this many seeds"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a model this small trains fastest on one thread

    runs = [
        train("unrescued", args.steps, [], args.logdir),
        train("rescued", args.steps, remedies(), args.logdir),
    ]
    for run in runs:
        print(describe(run))
    if args.seeds > 1:
        print(over_seeds(args.steps, args.seeds))
    if args.plot:
        plot(runs, args.plot)
        print(f"loss curves saved to {args.plot}")
    return runs


if __name__ == "__main__":
    main()
