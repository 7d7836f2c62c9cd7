"""What one step looks like to detectors and remedies, and what ``GradWatch.step`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.alerts import Alert, AlertKind
from gradwatch.distributed import all_reduce_max_
from gradwatch.layers import Layer
from gradwatch.transfer import to_host

if TYPE_CHECKING:
    from gradwatch.advice import ModelProfile
    from gradwatch.probe import GradientProbe


@dataclass
class WatchContext:
    """Everything fixed about a watched model, built once at the first step.

    Attributes:
        model: The unwrapped model.
        optimizer: The optimizer, if given.
        scaler: The AMP GradScaler, if given.
        layers: Layers in forward order.
        device: Home device of every engine tensor.
        numels: ``[L]`` float32 element counts per layer (full, unsharded sizes).
        probe: The gradient probe (remedies use it to reach the gradients).
        profile: What the model contains, for advice.
        activations: The activation monitor (``check_activations=True``), else None.
        remedies: The remedies in use (advice never suggests one of them again).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scaler: Any
    layers: list[Layer]
    device: torch.device
    numels: torch.Tensor
    probe: GradientProbe
    activations: Any = None
    remedies: tuple[Any, ...] = ()
    _profile: ModelProfile | None = None

    @property
    def profile(self) -> ModelProfile:
        """What the model contains (activations, normalisation, init scale...), for advice.

        Inspected on first use, at a flush: measuring the init scale reads values on the host.
        """
        if self._profile is None:
            from gradwatch.advice import ModelProfile

            self._profile = ModelProfile.inspect(
                self.model, self.optimizer, remedies=self.remedies, scaler=self.scaler
            )
        return self._profile

    @property
    def layer_names(self) -> list[str]:
        """Layer names in forward order."""
        return [layer.name for layer in self.layers]

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.layers)


@dataclass
class StepObservation:
    """One step's measurements, all device tensors (no host sync to build or read them).

    Detectors read it; remedies read it and act through :meth:`scale_grads`, ``lr_scale`` and
    ``skip``. Norms are measured before any remedy; ``norms_now``/``total_now`` follow the remedies.

    Attributes:
        step: Step number (from 0).
        pattern: Which parameters have a gradient (probe key).
        sq_norms: ``[L]`` per-layer sums of squares of the gradients.
        norms: ``[L]`` per-layer L2 gradient norms.
        total_norm: 0-d total L2 gradient norm.
        has_grad: ``[L]`` whether the layer has any gradient this step.
        weight_norms: ``[L]`` per-layer L2 weight norms (refreshed at step 0 and every flush step).
        update_ratio: ``[L]`` last measured ``||Δw|| / ||w||`` (``track_updates=True``), else None.
        loss: 0-d detached loss passed to ``step()``, or None.
        grads_finite: 0-d bool, every gradient finite.
        loss_finite: 0-d bool, the loss finite (True when no loss was given).
        overflow: 0-d bool, an AMP overflow step (non-finite gradients while a GradScaler is still
            backing off); such steps are left out of every statistic.
        valid: 0-d bool, the step may enter statistics (finite gradients, no overflow).
        activations: Activation statistics (``check_activations=True``), else None.
        flags: 0-d bool per alert kind detected this step (filled as detectors run).
        clip_coef: 0-d cumulative gradient scale applied by remedies, or None.
        lr_scale: Learning-rate scale applied to this step's update.
        skip: Whether this step's update must not happen.
    """

    step: int
    pattern: tuple[int, ...]
    sq_norms: torch.Tensor
    norms: torch.Tensor
    total_norm: torch.Tensor
    has_grad: torch.Tensor
    weight_norms: torch.Tensor
    update_ratio: torch.Tensor | None
    loss: torch.Tensor | None
    grads_finite: torch.Tensor
    loss_finite: torch.Tensor
    overflow: torch.Tensor
    valid: torch.Tensor
    context: WatchContext
    activations: Any = None
    flags: dict[AlertKind, torch.Tensor] = field(default_factory=dict)
    clip_coef: torch.Tensor | None = None
    lr_scale: float = 1.0
    skip: bool = False
    norms_now: torch.Tensor | None = None
    total_now: torch.Tensor | None = None
    _host_flags: dict[AlertKind, bool] | None = None

    def __post_init__(self) -> None:
        self.norms_now = self.norms
        self.total_now = self.total_norm

    def grads(self) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """Parameters with a gradient this step and their local gradient tensors."""
        return self.context.probe.grads(self.pattern)

    def scale_grads(self, coef: torch.Tensor) -> None:
        """Multiplies every gradient by the 0-d ``coef`` on the device (no sync); tracks norms."""
        _, grads = self.grads()
        coef = coef.detach().to(torch.float32)
        for device_grads in _group_by_device_dtype(grads):
            torch._foreach_mul_(
                device_grads, coef.to(device_grads[0].device, device_grads[0].dtype)
            )
        self.clip_coef = coef if self.clip_coef is None else self.clip_coef * coef
        self.norms_now = self.norms_now * coef  # type: ignore[operator]
        self.total_now = self.total_now * coef  # type: ignore[operator]

    def refresh_norms(self) -> None:
        """Re-measures ``norms_now``/``total_now`` after a remedy changed gradients unevenly."""
        sq, _ = self.context.probe.grad_sq_norms(self.pattern)
        self.norms_now = sq.sqrt()
        self.total_now = sq.sum().sqrt()

    def host_flags(self) -> dict[AlertKind, bool]:
        """This step's detection flags on the host: one transfer per step, shared by all callers.

        Only remedies that must decide on the host (LR backoff, skip step) call this. Under
        ``torch.distributed`` the flags are OR-ed over ranks first (one tiny all-reduce), so a
        per-rank quantity such as the loss or an activation never splits the ranks' decisions.
        """
        if self._host_flags is None:
            kinds = list(self.flags)
            extra = [~self.grads_finite & ~self.overflow, ~self.loss_finite]
            stacked = torch.stack([self.flags[k] for k in kinds] + extra).float()
            values = to_host([all_reduce_max_(stacked)])[0]
            self._host_flags = {
                k: bool(v) for k, v in zip(kinds, values[: len(kinds)], strict=True)
            }
            self._host_flags[AlertKind.NONFINITE] = bool(
                self._host_flags.get(AlertKind.NONFINITE, False) or values[-2] or values[-1]
            )
        return self._host_flags


@dataclass
class Detection:
    """A detector's verdict for one step (device tensors).

    The watch keeps the tensors until the next flush: a detector must not modify them in place
    afterwards (return fresh tensors, e.g. results of ``torch.where``).

    Attributes:
        fired: 0-d bool, the condition holds at this step.
        value: 0-d float, the measured quantity.
        scores: ``[C]`` float over the detector's candidate names; names with a positive score are
            named in the alert, highest score first. None names no layer.
    """

    fired: torch.Tensor
    value: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass
class StepReport:
    """What ``GradWatch.step`` returns.

    Attributes:
        step: The step number (from 0).
        skipped: The update of this step must not happen (a SkipStep remedy decided so).
        alerts: Alerts that materialised during this call (at a flush).
        total_norm: 0-d total gradient norm before remedies (not synced).
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


def _group_by_device_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())
