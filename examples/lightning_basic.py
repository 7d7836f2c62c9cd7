"""Lightning: one callback watches every optimizer step and logs into the trainer's logger.

A deep sigmoid MLP (the textbook vanishing-gradient case) is trained with a Lightning ``Trainer``
and a ``GradWatchCallback`` that clips with ``gw.ZClip``. gradwatch steps at
``on_before_optimizer_step`` (after backward and AMP unscaling, before Lightning's own gradient
clipping), numbers its steps with ``trainer.global_step``, writes into the ``TensorBoardLogger``'s
own run directory, and prints its diagnosis at the end of ``fit`` because it found vanishing
gradients. The second run fixes the model (ReLU, He initialisation, BatchNorm) and stays quiet.

Run:
    python examples/lightning_basic.py [--steps 60] [--logdir runs/lightning_basic]
    tensorboard --logdir runs/lightning_basic   # gradwatch/grad_norm/<layer>, gradient_flow, ...
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch as gw
from gradwatch.lightning import GradWatchCallback


class Regressor(pl.LightningModule):
    """Fits ``net`` to a fixed synthetic regression task with SGD."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def mlp(depth: int, activation: type[nn.Module], healthy: bool) -> nn.Sequential:
    """``depth`` linear layers of width 32; the healthy variant adds He init and BatchNorm."""
    layers: list[nn.Module] = []
    width_in = 16
    for _ in range(depth - 1):
        linear = nn.Linear(width_in, 32)
        layers.append(linear)
        if healthy:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            layers.append(nn.BatchNorm1d(32))
        layers.append(activation())
        width_in = 32
    layers.append(nn.Linear(width_in, 1))
    return nn.Sequential(*layers)


def train(name: str, net: nn.Module, steps: int, logdir: str) -> GradWatchCallback:
    """Trains ``net`` for ``steps`` optimizer steps with the gradwatch callback."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 16, generator=generator)
    targets = torch.sin(inputs @ torch.randn(16, 1, generator=generator))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=32, shuffle=True)
    callback = GradWatchCallback(remedies=[gw.ZClip()])  # log_every_n_steps: the trainer's
    trainer = pl.Trainer(
        max_steps=steps,
        log_every_n_steps=10,
        accelerator="cpu",
        logger=TensorBoardLogger(logdir, name=name),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(net), loader)  # prints callback.summary() when there were alerts
    return callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--logdir", default="runs/lightning_basic", help="TensorBoard directory")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    torch.manual_seed(0)

    sick = train("sigmoid", mlp(20, nn.Sigmoid, healthy=False), args.steps, args.logdir)
    print(f"sigmoid MLP: {len(sick.alerts)} alert(s):", [a.kind.value for a in sick.alerts])
    healthy = train("relu_he_bn", mlp(20, nn.ReLU, healthy=True), args.steps, args.logdir)
    print(f"ReLU + He + BatchNorm MLP: {len(healthy.alerts)} alert(s)")
    print(f"\nLook at TensorBoard: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
