"""What detectors and remedies see of a step, and what they answer.

The contract is narrow and one-way: the engine builds an :class:`Observation` (read-only device
tensors), a detector answers with a :class:`Detection`, a remedy with a :class:`Decision`. Neither
writes into shared state nor reaches into another component, so both can be tested against an
observation built by hand (``tests/factories.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from gradwatch.engine.alerts import Alert, AlertKind

if TYPE_CHECKING:
    from gradwatch.engine.activations import ActivationStats


@dataclass(frozen=True)
class Observation:
    """A block of ``k`` consecutive steps, as device tensors (no host sync to build or read them).

    Step-cadence detectors see every step as it happens (``k == 1``); flush-cadence detectors see
    the steps since the previous flush at once. Norms are measured before any remedy.

    Attributes:
        steps: The ``k`` step numbers.
        norms: ``[k, L]`` per-layer L2 gradient norms.
        totals: ``[k]`` total L2 gradient norms.
        valid: ``[k]`` bool: the step may enter statistics (finite gradients and loss, no AMP
            overflow).
        has_grad: ``[L]`` bool: the layer has a gradient (at the newest step).
        weight_norms: ``[L]`` per-layer L2 weight norms (refreshed at flush steps).
        grads_finite: ``[k]`` bool: every gradient finite.
        loss_finite: ``[k]`` bool: the loss finite (True when no loss was given).
        overflow: ``[k]`` bool: an AMP overflow step (non-finite gradients while a GradScaler still
            backs off); such steps are left out of every statistic.
        update_ratio: ``[L]`` last measured ``||Δw|| / ||w||`` (``track_updates=True``), else None.
        update_applied: 0-d bool: the update that ``update_ratio`` measured really happened (not
            skipped, not an overflow step); None without a new measurement at this step.
        activations: Activation statistics of the newest step (``check_activations=True``).
    """

    steps: tuple[int, ...]
    norms: torch.Tensor
    totals: torch.Tensor
    valid: torch.Tensor
    has_grad: torch.Tensor
    weight_norms: torch.Tensor
    grads_finite: torch.Tensor
    loss_finite: torch.Tensor
    overflow: torch.Tensor
    update_ratio: torch.Tensor | None = None
    update_applied: torch.Tensor | None = None
    activations: ActivationStats | None = None


@dataclass(frozen=True)
class Detection:
    """A detector's verdicts for the ``k`` steps of an observation (device tensors).

    The engine keeps the tensors until the next flush: a detector must not modify them in place
    afterwards (return fresh tensors, e.g. results of ``torch.where``).

    A step-cadence detector (``k == 1``) may also answer with 0-d ``fired``/``value`` and ``[C]``
    scores.

    Attributes:
        fired: ``[k]`` bool: the condition holds at that step.
        value: ``[k]`` float: the measured quantity.
        scores: ``[k, C]`` float over the detector's candidate names; names with a positive score
            are named in the alert, highest score first. None names no layer.
    """

    fired: torch.Tensor
    value: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass(frozen=True)
class RemedyInput:
    """What a remedy sees: the step, and what the remedies before it decided.

    Attributes:
        obs: The step (``k == 1``).
        flags: 0-d bool per alert kind detected at this step (OR-ed over ranks when distributed);
            ``AlertKind.NONFINITE`` is set for a non-finite gradient or loss even without a
            detector.
        total_now: 0-d total gradient norm after the earlier remedies.
        grads: Returns the parameters with a gradient and their local gradient tensors (for
            remedies that look at individual tensors, like AGC).
        host_flags: Returns ``flags`` on the host: one small transfer per step, shared by every
            remedy that decides on the host.
    """

    obs: Observation
    flags: dict[AlertKind, torch.Tensor]
    total_now: torch.Tensor
    grads: Callable[[], tuple[list[nn.Parameter], list[torch.Tensor]]]
    host_flags: Callable[[], dict[AlertKind, bool]]


@dataclass(frozen=True)
class Decision:
    """One remedy's decision for a step.

    Attributes:
        clip_coef: 0-d device factor every gradient is multiplied by.
        tensor_coefs: Per-tensor factors ``(gradient, factor)`` (AGC's unit-wise clipping, which no
            single factor expresses); the factor broadcasts against the gradient.
        skip: The update of this step must not happen (decided on the host).
        lr_scale: Factor on every learning rate for this step's update (decided on the host).
    """

    clip_coef: torch.Tensor | None = None
    tensor_coefs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    skip: bool = False
    lr_scale: float | None = None


@dataclass
class StepReport:
    """What ``GradWatch.step`` returns.

    Attributes:
        step: The step number (from 0).
        skipped: The update of this step must not happen (a SkipStep remedy decided so).
        alerts: Alerts that materialised during this call.
        total_norm: 0-d total gradient norm before remedies (not synced); None on a step that
            was not probed (``probe_every_n_steps``).
        clip_coef: 0-d coefficient the gradients were multiplied by, or None.
        lr_scale: Learning-rate scale applied to this step's update.
    """

    step: int
    skipped: bool = False
    alerts: list[Alert] = field(default_factory=list)
    total_norm: torch.Tensor | None = None
    clip_coef: torch.Tensor | None = None
    lr_scale: float = 1.0


def finite(values: torch.Tensor) -> torch.Tensor:
    """Element-wise "is finite" in two cheap device ops (NaN and Inf times 0 are NaN).

    On the hot path this is cheaper than ``torch.isfinite``, which is several kernels on CPU.
    """
    return (values * 0.0) == 0.0
