"""Small factories: a layout, an observation and a remedy input built by hand.

Detectors and remedies only see these, so they can be unit-tested without a model, an optimizer or
a watch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.layers import Layer, Layout
from gradwatch.engine.observation import Observation, RemedyInput


def layout(numels: Sequence[int] = (64, 64, 64, 64), activations: Sequence[str] = ()) -> Layout:
    """Layers ``"0"``, ``"1"``... (plain Linear modules) with the given element counts."""
    layers = []
    for index, numel in enumerate(numels):
        module = nn.Linear(numel, 1, bias=False)
        layers.append(Layer(str(index), module, [module.weight]))
    return Layout.build(layers, activations)


def observation(
    norms: Sequence[float] | Sequence[Sequence[float]],
    *,
    steps: Sequence[int] | None = None,
    weight_norms: Sequence[float] | None = None,
    valid: bool | Sequence[bool] = True,
    loss_finite: bool = True,
    overflow: bool = False,
    update_ratio: Sequence[float] | None = None,
    update_applied: bool = True,
    lr: Sequence[float] | None = None,
    update_rule: str | None = None,
) -> Observation:
    """An observation of one step (``norms`` of length L) or of ``k`` steps (``[k, L]``)."""
    rows = torch.tensor(norms, dtype=torch.float32)
    rows = rows[None] if rows.dim() == 1 else rows
    k, num_layers = rows.shape
    totals = rows.square().sum(1).sqrt()
    valid_rows = torch.tensor(valid, dtype=torch.bool).expand(k).clone()
    grads_finite = torch.isfinite(totals)
    return Observation(
        steps=tuple(steps) if steps is not None else tuple(range(k)),
        norms=rows,
        totals=totals,
        valid=valid_rows & grads_finite,
        has_grad=torch.ones(num_layers, dtype=torch.bool),
        weight_norms=torch.tensor(weight_norms if weight_norms is not None else [1.0] * num_layers),
        grads_finite=grads_finite,
        loss_finite=torch.full((k,), loss_finite),
        overflow=torch.full((k,), overflow),
        update_ratio=torch.tensor(update_ratio) if update_ratio is not None else None,
        update_applied=torch.tensor(update_applied) if update_ratio is not None else None,
        lr=torch.tensor(lr, dtype=torch.float32) if lr is not None else None,
        update_rule=update_rule,
    )


def remedy_input(
    obs: Observation,
    *,
    flags: dict[AlertKind, bool] | None = None,
    total_now: float | None = None,
    grads: tuple[list[nn.Parameter], list[torch.Tensor]] = ([], []),
) -> RemedyInput:
    """What a remedy sees for ``obs`` (one step), with the given detection flags."""
    total = torch.tensor(total_now) if total_now is not None else obs.totals[0]
    return RemedyInput(
        obs=obs,
        flags={kind: torch.tensor(value) for kind, value in (flags or {}).items()},
        total_now=total,
        grads=lambda: grads,
        grad_factor=None,
        tensor_sq_norms=lambda: torch.stack([g.float().square().sum() for g in grads[1]]),
        total_norm=lambda norm_type: total,
    )
