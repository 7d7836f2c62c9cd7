"""Declared state: what a detector or remedy remembers, declared once, saved and restored for free.

Modelled on torchmetrics' ``Metric.add_state``: a component declares each piece of state in its
``__init__`` with its shape and initial value; :meth:`Stateful.reset_state` materialises it on the
device once the layers are known, and :meth:`Stateful.state_dict` and
:meth:`Stateful.load_state_dict` turn all of it into plain values and back. Device state is only
read on the host by ``state_dict`` (at flushes and checkpoints), never on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from gradwatch.engine.transfer import to_host

Size = int | Literal["scalar", "layers", "layers+1", "activations", "host"]
"""The shape of a piece of state: a fixed length, one value, one per layer (``"layers+1"``: and
one for the total), one per hooked activation module, or a plain host value."""


@dataclass(frozen=True)
class Counts:
    """The sizes state can depend on, known once the watch knows its layers.

    Attributes:
        layers: Number of layers.
        activations: Number of hooked activation modules.
        device: Where device state lives.
    """

    layers: int
    activations: int
    device: torch.device


@dataclass(frozen=True)
class _Spec:
    size: Size
    default: Any
    dtype: torch.dtype | None = None


class Stateful:
    """Base of detectors and remedies: declared state with one ``state_dict`` implementation."""

    def __init__(self) -> None:
        self._specs: dict[str, _Spec] = {}

    def add_state(
        self, name: str, default: Any, size: Size = "host", dtype: torch.dtype | None = None
    ) -> None:
        """Declares the attribute ``name``: a device tensor of ``size`` filled with ``default``
        (materialised by :meth:`reset_state`; float32 unless ``dtype``), or with ``size="host"`` a
        plain value."""
        self._specs[name] = _Spec(size, default, dtype)
        setattr(self, name, default if size == "host" else None)

    def reset_state(self, counts: Counts) -> None:
        """(Re)creates every declared piece of state at its initial value."""
        for name, spec in self._specs.items():
            if spec.size == "host":
                setattr(self, name, spec.default)
                continue
            shape = _shape(spec.size, counts)
            value = torch.full(shape, float(spec.default), dtype=spec.dtype, device=counts.device)
            setattr(self, name, value)

    def state_dict(self) -> dict[str, Any]:
        """Every declared piece of state as plain values (floats, ints, lists); one transfer."""
        device_names = [n for n, s in self._specs.items() if s.size != "host"]
        tensors = [getattr(self, n) for n in device_names]
        if any(t is None for t in tensors):  # not bound yet: nothing measured
            return {n: getattr(self, n) for n, s in self._specs.items() if s.size == "host"}
        values = dict(zip(device_names, to_host(tensors), strict=True))
        out: dict[str, Any] = {}
        for name, spec in self._specs.items():
            value = getattr(self, name) if spec.size == "host" else values[name]
            out[name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (after the watch bound this component).

        Keys added in later versions are simply missing from older states and keep their initial
        value.

        Raises:
            ValueError: A saved tensor does not have the shape of this component's state (the
                state comes from another model).
        """
        for name, spec in self._specs.items():
            if name not in state:
                continue
            if spec.size == "host":
                setattr(self, name, type(spec.default)(state[name]))
                continue
            current: torch.Tensor = getattr(self, name)
            saved = torch.tensor(state[name], dtype=current.dtype)
            if saved.shape != current.shape:
                raise ValueError(
                    f"{type(self).__name__}.{name}: saved shape {tuple(saved.shape)} does not "
                    f"match {tuple(current.shape)}"
                )
            current.copy_(saved.to(current.device))


def _shape(size: Size, counts: Counts) -> tuple[int, ...]:
    if size == "scalar":
        return ()
    if size == "layers":
        return (counts.layers,)
    if size == "layers+1":
        return (counts.layers + 1,)
    if size == "activations":
        return (counts.activations,)
    assert isinstance(size, int)
    return (size,)
