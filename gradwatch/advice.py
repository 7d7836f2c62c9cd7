"""Advice: what the model contains, and the remedies that fit it for each alert kind."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gradwatch.alerts import AlertKind


@dataclass
class ModelProfile:
    """What a model contains, inspected once.

    Attributes:
        activations: Class names of activation modules found (``"Sigmoid"``, ``"ReLU"``...).
        has_norm: Any normalisation layer.
        recurrent: Class names of recurrent modules (``"RNN"``, ``"LSTM"``...).
        depth: Number of layers with weights.
        optimizer: Optimizer class name, if known.
        lr: Largest learning rate of the optimizer's groups, if known.
    """

    activations: set[str] = field(default_factory=set)
    has_norm: bool = False
    recurrent: set[str] = field(default_factory=set)
    depth: int = 0
    optimizer: str | None = None
    lr: float | None = None

    @classmethod
    def inspect(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> ModelProfile:
        """Looks through ``model`` (and ``optimizer``) once."""
        profile = cls()
        for module in model.modules():
            name = type(module).__name__
            if name in _ACTIVATIONS:
                profile.activations.add(name)
            if isinstance(module, _NORMS):
                profile.has_norm = True
            if isinstance(module, nn.RNNBase | nn.RNNCellBase):
                profile.recurrent.add(name)
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                profile.depth += 1
        if optimizer is not None:
            profile.optimizer = type(optimizer).__name__
            lrs = [g.get("lr") for g in optimizer.param_groups]
            profile.lr = max(float(lr) for lr in lrs if lr is not None) if lrs else None
        return profile


_ACTIVATIONS = {"Sigmoid", "Tanh", "ReLU", "LeakyReLU", "GELU", "SiLU", "ELU", "Softplus",
                "Hardtanh", "Hardsigmoid", "Mish", "PReLU", "SELU", "ReLU6", "Softsign"}
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def advise(kind: AlertKind, profile: ModelProfile) -> tuple[str, ...]:
    """Remedies that fit ``profile`` for an alert of ``kind``."""
    out: list[str] = []
    if kind is AlertKind.VANISHING:
        saturating = profile.activations & {"Sigmoid", "Tanh"}
        if saturating:
            out.append(f"replace {'/'.join(sorted(saturating))} with ReLU/GELU")
        if not profile.has_norm:
            out.append("add BatchNorm/LayerNorm")
        out.append("use He (Kaiming) initialisation")
    elif kind in (AlertKind.EXPLODING, AlertKind.SPIKE):
        out += ["lower the learning rate", "clip gradients (gw.ClipNorm or gw.ZClip)"]
    elif kind is AlertKind.NONFINITE:
        out += ["lower the learning rate", "skip poisoned steps (gw.SkipStep)"]
    return tuple(out)
