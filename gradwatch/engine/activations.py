"""Activation monitor: forward hooks that reduce activation statistics on the device.

With ``check_activations=True`` an :class:`ActivationMonitor` hooks every activation module of the
model, recognised by role (:mod:`gradwatch.engine.roles`: torch's classes and their subclasses,
and library activations such as ``transformers``' ``GELUActivation`` by name). Each hooked forward
call during training (autograd enabled) reduces its output on the device, without a host sync:

- saturating activations (sigmoid, tanh, hardtanh, softsign...): the number of outputs in the flat
  regions, where the derivative is a few percent of its peak (within
  :data:`~gradwatch.engine.thresholds.SATURATION_MARGIN` of a bound of the output range);
- rectifiers (ReLU, ReLU6, library ReLU variants): per unit, whether it produced a positive output
  during the step; across steps, how many steps each unit has been idle. A unit is a feature: the
  channel dimension (dim 1) of 4-d and 5-d outputs (convolutions), otherwise the last dimension.

Smooth activations (GELU, SiLU, Mish...) are hooked and recorded as ran, but neither count: they are
not bounded (no flat region to saturate in) and have no exact-zero region where a unit can die
(GELU's minimum is about -0.17, its gradient is zero at one point only). Which module produced the
first NaN/Inf is :mod:`gradwatch.engine.origin`'s job (every module, not only activations).

Functional activations (``torch.sigmoid(x)``, ``F.relu(x)`` inside a ``forward``) are not modules
and cannot be hooked. ``nn.LSTM``/``nn.GRU`` compute their sigmoid/tanh gates inside one fused cell:
there is no gate module to hook and no gate output to read, so recurrent gates are not monitored
(the recurrent model's gradient norms and the advice cover them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradwatch.engine.hooks import ForwardHook, Handles
from gradwatch.engine.roles import Role, activation_role, output_range
from gradwatch.engine.thresholds import SATURATION_MARGIN

_FOLD_AFTER = 16  # forwards per step after which a module's pending statistics are summed up


@dataclass(frozen=True)
class ActivationStats:
    """One step's activation statistics (device tensors), from :meth:`ActivationMonitor.collect`.

    Attributes:
        saturated: ``[M]`` fraction of outputs in the flat regions per module (0 for modules that
            are not saturating or did not run).
        ran: ``[M]`` bool: the module ran (with autograd enabled) during this step.
        idle_steps: ``[U]`` float: per rectifier unit (all rectifier modules' units concatenated),
            steps in a row without a positive output, this step included.
        unit_module: ``[U]`` long: the module index of each unit.
        units: ``[M]`` float: units per module (0 for modules without units).
    """

    saturated: torch.Tensor
    ran: torch.Tensor
    idle_steps: torch.Tensor
    unit_module: torch.Tensor
    units: torch.Tensor


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
        roles: The activation role of each hooked module.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self.roles: list[Role] = []
        self._bounds: list[tuple[float, float]] = []
        self._handles = Handles(self)
        for name, module in activation_modules(model):
            role = activation_role(module)
            if role is None:
                continue
            index = len(self.names)
            self.names.append(name)
            self.roles.append(role)
            low, high = output_range(module) if role is Role.SATURATING else (0.0, 0.0)
            self._bounds.append((low + SATURATION_MARGIN, high - SATURATION_MARGIN))
            self._handles.add(
                module.register_forward_hook(ForwardHook(self, ActivationMonitor._record, index))
            )
        count = len(self.names)
        self._saturated: list[list[tuple[torch.Tensor, int]]] = [[] for _ in range(count)]
        self._ran = [False] * count
        self._active: list[torch.Tensor | None] = [None] * count
        self._ran_masks: dict[tuple[bool, ...], torch.Tensor] = {}
        self._device: torch.device | None = None
        self._output_device = torch.device("cpu")  # of the latest hooked output
        self._idle = torch.zeros(0)  # [U] steps idle per unit, modules in first-run order
        self._unit_module = torch.zeros(0, dtype=torch.long)
        self._offsets: dict[int, tuple[int, int]] = {}  # module -> (start, units) in ``_idle``
        self._units = torch.zeros(count)

    def _record(self, index: int, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or not torch.is_grad_enabled():
            return
        output = output.detach()
        self._ran[index] = True
        self._output_device = output.device
        if (
            output.layout != torch.strided  # sparse (COO, CSR...) outputs: nothing to reduce here
            or output.is_nested
            or output.numel() == 0
            or not output.is_floating_point()
        ):
            return
        role = self.roles[index]
        if role is Role.SATURATING:
            low, high = self._bounds[index]
            flat = (output < low) | (output > high)
            counts = self._saturated[index]
            counts.append((flat.sum(), output.numel()))
            if len(counts) >= _FOLD_AFTER:  # many forwards without a step: keep memory bounded
                counts[:] = [(_add(c for c, _ in counts), sum(n for _, n in counts))]
        elif role is Role.RECTIFIER:
            unit_dim = 1 if output.dim() >= 4 else output.dim() - 1
            other = tuple(d for d in range(output.dim()) if d != unit_dim)
            peak = output.amax(dim=other) if other else output
            active = (peak > 0).reshape(-1)
            seen = self._active[index]
            if seen is None or seen.shape != active.shape:
                self._active[index] = active
            else:
                seen.logical_or_(active)

    def collect(self) -> ActivationStats | None:
        """This step's statistics, then clears them; None if no hooked forward ran since."""
        ran = tuple(self._ran)
        if not any(ran):
            return None
        self._ran = [False] * len(ran)
        device = self._output_device
        if self._device != device:
            self._device = device
            self._ran_masks = {}
            self._idle = self._idle.to(device)
            self._unit_module = self._unit_module.to(device)
            self._units = self._units.to(device)
        zero = torch.zeros((), device=device)
        saturated = []
        for counts in self._saturated:
            if counts:
                total = sum(numel for _, numel in counts)
                saturated.append(_add(count for count, _ in counts).float().to(device) / total)
            else:
                saturated.append(zero)
            counts.clear()
        ran_mask = self._ran_masks.get(ran)
        if ran_mask is None:
            ran_mask = self._ran_masks[ran] = torch.tensor(ran, device=device)
        self._count_idle_steps(device)
        return ActivationStats(
            saturated=torch.stack(saturated),
            ran=ran_mask,
            idle_steps=self._idle,
            unit_module=self._unit_module,
            units=self._units,
        )

    def _count_idle_steps(self, device: torch.device) -> None:
        """Adds this step's rectifier activity to the per-unit idle counters (one op per module)."""
        actives = []
        for index, active in enumerate(self._active):
            if active is None:
                continue
            self._active[index] = None
            if index not in self._offsets:  # first run: the module's units join the counters
                self._add_units(index, torch.zeros(active.numel(), device=device))
            start, count = self._offsets[index]
            if active.numel() == count:
                actives.append((start, count, active.to(device)))
        idle = self._idle + 1.0
        for start, count, active in actives:
            idle[start : start + count].masked_fill_(active, 0.0)
        self._idle = idle

    def _add_units(self, index: int, idle: torch.Tensor) -> None:
        """Appends module ``index``'s units (with their idle counts) to the counters."""
        self._offsets[index] = (self._idle.numel(), idle.numel())
        device = self._idle.device
        self._idle = torch.cat([self._idle, idle.to(device)])
        module_index = torch.full((idle.numel(),), index, device=device)
        self._unit_module = torch.cat([self._unit_module, module_index])
        self._units = self._units.clone()
        self._units[index] = idle.numel()

    def state_dict(self) -> dict[str, list[float]]:
        """The per-unit idle counters, by module name (plain values)."""
        values = self._idle.tolist()
        return {
            self.names[index]: values[start : start + count]
            for index, (start, count) in sorted(self._offsets.items(), key=lambda kv: kv[1][0])
        }

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        """Restores the idle counters of the modules that exist with the same number of units."""
        device = self._idle.device
        self._offsets = {}
        self._idle = torch.zeros(0, device=device)
        self._unit_module = torch.zeros(0, dtype=torch.long, device=device)
        self._units = torch.zeros(len(self.names), device=device)
        for name, values in state.items():
            if name in self.names:
                self._add_units(self.names.index(name), torch.tensor(values, dtype=torch.float32))

    def remove(self) -> None:
        """Removes every hook this monitor installed."""
        self._handles.remove()


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation modules of ``model`` (by role), with their paths, in registration order."""
    return [(name, module) for name, module in model.named_modules() if activation_role(module)]


def _add(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of tensors: one add per extra element, nothing at all for the common single one."""
    iterator = iter(tensors)
    total = next(iterator)
    for tensor in iterator:
        total = total + tensor
    return total
