"""What detectors and remedies see of a step, and what they answer.

The contract is narrow and one-way: the engine builds an :class:`Observation` (read-only device
tensors), a detector answers with a :class:`Detection`, a remedy with a :class:`Decision`. Neither
writes into shared state nor reaches into another component, so both can be tested against an
observation built by hand (``tests/factories.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from gradwatch.engine.alerts import Alert, AlertKind

if TYPE_CHECKING:
    from gradwatch.engine.activations import ActivationStats
    from gradwatch.engine.origin import ForwardChecks


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
        forward: Non-finite checks of the newest step's forward passes (its input, its output,
            with ``check_activations=True`` every module's output), None when none was seen.
        lr: ``[L]`` learning rate each layer's coming update uses (RMS over its elements, times
            the LR remedies' scale of the previous step; 0 for layers the optimizer does not
            update), or None without an optimizer.
        update_rule: How the optimizer turns gradients into updates: ``"adaptive"`` (Adam family:
            a per-element step of about ``lr``), ``"sgd"`` (``lr`` times the gradient), or None
            (no optimizer, or another rule).
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
    forward: ForwardChecks | None = None
    lr: torch.Tensor | None = None
    update_rule: str | None = None


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

    Everything is on the device: a remedy decides without reading a value on the host.

    Attributes:
        obs: The step (``k == 1``).
        flags: 0-d bool per alert kind detected at this step (OR-ed over ranks when distributed);
            ``AlertKind.NONFINITE`` is set for a non-finite gradient or loss even without a
            detector.
        total_now: 0-d total L2 gradient norm after the earlier remedies.
        grads: Returns the parameters with a gradient and their local gradient tensors (for
            remedies that look at individual tensors, like AGC).
        grad_factor: 0-d factor that turns the tensors ``grads()`` returns into the gradients the
            remedy reasons about (the clipping of earlier remedies not applied yet, divided by an
            AMP loss scale still in the gradients), or None for 1.
        tensor_sq_norms: Returns the ``[P]`` squared L2 norms of the tensors ``grads()`` returns,
            as they are stored (multiply by ``grad_factor**2``), without a pass over them.
        total_norm: ``total_norm(norm_type)``: the total norm after the earlier remedies,
            computed as ``torch.nn.utils.clip_grad_norm_`` does (per-tensor norms in the
            gradients' precision, in ``model.parameters()`` order); free for ``norm_type=2``, one
            read of the gradients otherwise.
        output_params: ``id()`` of the parameters of the layers that produce the model output.
    """

    obs: Observation
    flags: dict[AlertKind, torch.Tensor]
    total_now: torch.Tensor
    grads: Callable[[], tuple[list[nn.Parameter], list[torch.Tensor]]]
    grad_factor: torch.Tensor | None
    tensor_sq_norms: Callable[[], torch.Tensor]
    total_norm: Callable[[float], torch.Tensor]
    output_params: frozenset[int] = frozenset()

    def flagged(self, kinds: Iterable[AlertKind]) -> torch.Tensor:
        """0-d device bool: any of ``kinds`` was detected at this step."""
        found = [self.flags[kind] for kind in kinds if kind in self.flags]
        if not found:
            return torch.zeros((), dtype=torch.bool, device=self.total_now.device)
        out = found[0]
        for flag in found[1:]:
            out = out | flag
        return out


@dataclass(frozen=True)
class Decision:
    """One remedy's decision for a step, as device tensors (nothing is read on the host).

    Attributes:
        clip_coef: 0-d factor on every gradient (clipping).
        tensor_coefs: Per-tensor factors ``(gradient, factor)`` (AGC's unit-wise clipping, which no
            single factor expresses); the factor broadcasts against the gradient. The engine
            multiplies them in at once.
        tensor_sq_norms: With ``tensor_coefs``: the ``[P]`` squared norms of the stored gradients
            after those factors (as :attr:`RemedyInput.tensor_sq_norms`), so the total norm the
            next remedies see needs no new pass; None to have them measured again.
        skip: 0-d bool: the update of this step must not happen.
        lr_scale: 0-d factor (or a number) on every learning rate for this step's update.
    """

    clip_coef: torch.Tensor | None = None
    tensor_coefs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    tensor_sq_norms: torch.Tensor | None = None
    skip: torch.Tensor | None = None
    lr_scale: torch.Tensor | float | None = None


class StepReport:
    """What ``GradWatch.step`` returns.

    The decisions stay on the device: :attr:`skipped` and :attr:`lr_scale` read them on the host
    the first time they are asked for (one small transfer; a loop that never asks never pays it,
    e.g. with ``attach()`` or a fused optimizer that enforces the skip itself).

    Example:
        >>> report = StepReport(step=3, skipped=torch.tensor(True))
        >>> report.skipped
        True

    Args:
        step: The step number (from 0).
        skipped: Whether the update of this step must not happen: a bool or a 0-d device bool.
        alerts: Alerts that materialised during this call.
        total_norm: 0-d total gradient norm before remedies (not synced); None on a step that
            was not probed (``probe_every_n_steps``).
        clip_coef: 0-d coefficient the gradients are multiplied by, or None.
        lr_scale: Learning-rate scale of this step's update: a number or a 0-d device tensor.
    """

    def __init__(
        self,
        step: int,
        skipped: bool | torch.Tensor = False,
        alerts: list[Alert] | None = None,
        total_norm: torch.Tensor | None = None,
        clip_coef: torch.Tensor | None = None,
        lr_scale: float | torch.Tensor = 1.0,
    ) -> None:
        self.step = step
        self.alerts: list[Alert] = list(alerts) if alerts is not None else []
        self.total_norm = total_norm
        self.clip_coef = clip_coef
        self._skipped = skipped
        self._lr_scale = lr_scale

    @property
    def skipped(self) -> bool:
        """The update of this step must not happen (a SkipStep remedy decided so); reading it
        copies the device flag to the host once."""
        if isinstance(self._skipped, torch.Tensor):
            self._skipped = bool(self._skipped)
        return self._skipped

    @property
    def skip_flag(self) -> torch.Tensor | bool:
        """:attr:`skipped` without a host read (a 0-d device bool when a remedy decided)."""
        return self._skipped

    @property
    def lr_scale(self) -> float:
        """Learning-rate scale applied to this step's update (read on the host once)."""
        if isinstance(self._lr_scale, torch.Tensor):
            self._lr_scale = float(self._lr_scale)
        return self._lr_scale

    def __repr__(self) -> str:
        skipped = "<on device>" if isinstance(self._skipped, torch.Tensor) else self._skipped
        return (
            f"StepReport(step={self.step}, skipped={skipped}, alerts={self.alerts!r}, "
            f"total_norm={self.total_norm!r}, clip_coef={self.clip_coef!r})"
        )


def finite(values: torch.Tensor) -> torch.Tensor:
    """Element-wise "is finite" in two cheap device ops (NaN and Inf times 0 are NaN).

    On the hot path this is cheaper than ``torch.isfinite``, which is several kernels on CPU.
    """
    return (values * 0.0) == 0.0
