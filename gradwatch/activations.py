"""Activation monitor: forward hooks that reduce activation statistics on the device.

With ``GradWatch(check_activations=True)`` an :class:`ActivationMonitor` hooks every activation
module of the model. Each hooked forward call (training forwards only, i.e. with autograd enabled)
reduces its output on the device, without any host sync:

- saturating activations (``Sigmoid``, ``Tanh``, ``Hardsigmoid``, ``Hardtanh``): the number of
  outputs in the flat regions, where the derivative is a few percent of its peak (within
  :data:`gradwatch.detectors.SATURATION_MARGIN` of a bound of the output range);
- rectifiers (``ReLU``, ``ReLU6``): per unit, whether it produced a positive output at least once
  (OR-accumulated until :meth:`ActivationMonitor.dead_fractions` is read). A unit is a feature:
  the channel dimension (dim 1) of 4-d and 5-d outputs (convolutions), otherwise the last dimension
  (``[batch, features]``, ``[batch, time, features]``);
- every hooked module: whether its output holds a NaN/Inf, so the first non-finite output in forward
  order can be named.

Functional activations (``torch.sigmoid(x)``, ``F.relu(x)`` inside a ``forward``) are not modules
and cannot be hooked: only activation *modules* are monitored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch.detectors import SATURATION_MARGIN

_FOLD_AFTER = 16  # forwards per step after which a module's pending statistics are summed up
_SATURATING = "saturating"
_RECTIFIER = "rectifier"
_OTHER = "other"

# Activation module types by how they are monitored (exact types: ReLU6 subclasses Hardtanh).
_KINDS: dict[type[nn.Module], str] = {
    nn.Sigmoid: _SATURATING,
    nn.Tanh: _SATURATING,
    nn.Hardsigmoid: _SATURATING,
    nn.Hardtanh: _SATURATING,
    nn.ReLU: _RECTIFIER,
    nn.ReLU6: _RECTIFIER,
    **{
        cls: _OTHER
        for cls in (
            nn.LeakyReLU,
            nn.PReLU,
            nn.RReLU,
            nn.ELU,
            nn.CELU,
            nn.SELU,
            nn.GELU,
            nn.SiLU,
            nn.Mish,
            nn.Softplus,
            nn.Softsign,
            nn.LogSigmoid,
            nn.Hardswish,
            nn.Tanhshrink,
        )
    },
}


@dataclass
class ActivationStats:
    """One step's activation statistics (device tensors), from :meth:`ActivationMonitor.collect`.

    Attributes:
        saturated: ``[M]`` fraction of outputs in the flat regions per module (0 for modules that
            are not saturating or did not run).
        ran: ``[M]`` bool, the module ran (with autograd enabled) during this step.
        nonfinite: ``[M]`` bool, the module's output held a NaN/Inf during this step.
        forward_rank: ``[M]`` float, position of each module in the forward order (first forward).
        monitor: The monitor, for the windowed dead-unit statistics.
    """

    saturated: torch.Tensor
    ran: torch.Tensor
    nonfinite: torch.Tensor
    forward_rank: torch.Tensor
    monitor: ActivationMonitor


class ActivationMonitor:
    """Forward hooks on the activation modules of ``model``, reducing their outputs on the device.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.ReLU())
        >>> monitor = ActivationMonitor(model)
        >>> monitor.names
        ['1', '3']
        >>> _ = model(torch.randn(2, 4))
        >>> monitor.collect().ran.tolist()
        [True, True]
        >>> monitor.remove()

    Args:
        model: The module whose activation modules are hooked.

    Attributes:
        names: Module paths of the hooked modules (registration order); statistics index them.
        kinds: ``"saturating"``, ``"rectifier"`` or ``"other"`` per hooked module.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self.kinds: list[str] = []
        self._margins: list[tuple[float, float]] = []
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            kind = _KINDS.get(type(module))
            if kind is None:
                continue
            index = len(self.names)
            self.names.append(name)
            self.kinds.append(kind)
            self._margins.append(_flat_region(module))
            self._handles.append(module.register_forward_hook(self._hook(index)))
        count = len(self.names)
        self._saturated: list[list[tuple[torch.Tensor, int]]] = [[] for _ in range(count)]
        self._nonfinite: list[list[torch.Tensor]] = [[] for _ in range(count)]
        self._active: list[dict[int, torch.Tensor]] = [{} for _ in range(count)]
        self._order: list[int] = []
        self._seen: set[int] = set()
        self._rank: torch.Tensor | None = None
        self._ran_masks: dict[tuple[bool, ...], torch.Tensor] = {}
        self._zero: torch.Tensor | None = None

    def _hook(self, index: int) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and torch.is_grad_enabled():
                self._record(index, output.detach())

        return hook

    def _record(self, index: int, output: torch.Tensor) -> None:
        if index not in self._seen:
            self._seen.add(index)
            self._order.append(index)
            self._rank = None
        if output.numel() == 0:
            return
        kind = self.kinds[index]
        if kind == _SATURATING:
            center, limit = self._margins[index]
            distance = (output - center).abs()
            self._saturated[index].append(((distance > limit).sum(), output.numel()))
            nonfinite = ~torch.isfinite(distance.sum(dtype=torch.float32))
        elif kind == _RECTIFIER:
            unit_dim = 1 if output.dim() >= 4 else output.dim() - 1
            other = tuple(d for d in range(output.dim()) if d != unit_dim)
            peak = output.amax(dim=other) if other else output
            units = peak.shape[0] if peak.dim() else 1
            active = (peak > 0).reshape(units)
            seen = self._active[index].get(units)
            if seen is None:
                self._active[index][units] = active
            else:
                seen.logical_or_(active)
            nonfinite = ~torch.isfinite(peak.sum(dtype=torch.float32))
        else:
            nonfinite = ~torch.isfinite(output.sum(dtype=torch.float32))
        entries = self._nonfinite[index]
        entries.append(nonfinite)
        if len(entries) >= _FOLD_AFTER:  # many forwards without a step: keep memory bounded
            entries[:] = [_add(entries)]
            counts = self._saturated[index]
            if counts:
                counts[:] = [(_add(c for c, _ in counts), sum(n for _, n in counts))]

    def collect(self) -> ActivationStats | None:
        """This step's statistics, then clears them; None if no hooked forward ran since."""
        ran = tuple(bool(entries) for entries in self._nonfinite)
        if not any(ran):
            return None
        device = next(t for entries in self._nonfinite for t in entries).device
        if self._zero is None or self._zero.device != device:
            self._zero = torch.zeros((), device=device)
            self._ran_masks = {}
        saturated = []
        nonfinite = []
        for index, entries in enumerate(self._nonfinite):
            counts = self._saturated[index]
            if counts:
                total = sum(numel for _, numel in counts)
                saturated.append(_add(count for count, _ in counts).float() / total)
            else:
                saturated.append(self._zero)
            nonfinite.append(_add(entries).float() if entries else self._zero)
            entries.clear()
            counts.clear()
        ran_mask = self._ran_masks.get(ran)
        if ran_mask is None:
            ran_mask = self._ran_masks[ran] = torch.tensor(ran, device=device)
        return ActivationStats(
            saturated=torch.stack(saturated),
            ran=ran_mask,
            nonfinite=torch.stack(nonfinite) > 0,
            forward_rank=self._forward_rank(device),
            monitor=self,
        )

    def dead_fractions(self) -> torch.Tensor | None:
        """``[M]`` fraction of units that never fired since the last reset, and resets the record.

        0 for modules that are not rectifiers or did not run; None before any rectifier ran.
        """
        if not any(self._active):
            return None
        device = next(t for seen in self._active for t in seen.values()).device
        fractions = []
        for seen in self._active:
            if seen:
                active = _add(t.sum() for t in seen.values())
                fractions.append(1.0 - active.float() / sum(t.numel() for t in seen.values()))
            else:
                fractions.append(torch.zeros((), device=device))
            seen.clear()
        return torch.stack(fractions)

    def remove(self) -> None:
        """Removes every hook this monitor installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_rank(self, device: torch.device) -> torch.Tensor:
        if self._rank is None or self._rank.device != device:
            position = {index: rank for rank, index in enumerate(self._order)}
            ranks = [float(position.get(i, len(self.names))) for i in range(len(self.names))]
            self._rank = torch.tensor(ranks, device=device)
        return self._rank


def _flat_region(module: nn.Module) -> tuple[float, float]:
    """``(center, limit)``: an output ``y`` is in a flat region when ``|y - center| > limit``.

    That is, when ``y`` lies within :data:`~gradwatch.detectors.SATURATION_MARGIN` of a bound of the
    activation's output range.
    """
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        low, high = 0.0, 1.0
    elif isinstance(module, nn.Hardtanh):
        low, high = float(module.min_val), float(module.max_val)
    else:  # Tanh
        low, high = -1.0, 1.0
    return (low + high) / 2, (high - low) / 2 - SATURATION_MARGIN


def _add(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of tensors: one add per extra element, nothing at all for the common single one."""
    iterator = iter(tensors)
    total = next(iterator)
    for tensor in iterator:
        total = total + tensor
    return total
