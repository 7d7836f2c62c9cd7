"""Layers: modules that directly own trainable parameters, named by path, in forward order."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.engine.hooks import ForwardHook, Handles
from gradwatch.engine.state import Counts


@dataclass
class Layer:
    """One module that directly owns at least one trainable parameter.

    Attributes:
        name: Module path (``"encoder.0"``), ``""`` for the root module.
        module: The module itself.
        params: Its trainable parameters not already owned by an earlier layer (tied ones are
            counted once).
    """

    name: str
    module: nn.Module
    params: list[nn.Parameter]

    @property
    def numel(self) -> int:
        """Number of trainable elements, counting the full tensors of sharded parameters."""
        return sum(p.numel() for p in self.params)


@dataclass(frozen=True)
class Layout:
    """The watched layers in the order statistics use, and where the statistics live.

    Attributes:
        layers: Layers in forward order (registration order before the first forward).
        device: Home device of every engine tensor.
        numels: ``[L]`` float32 element counts per layer (full, unsharded sizes).
        activation_names: Module paths of the hooked activation modules (``check_activations``).
    """

    layers: tuple[Layer, ...]
    device: torch.device
    numels: torch.Tensor = field(repr=False)
    activation_names: tuple[str, ...] = ()

    @classmethod
    def build(cls, layers: Iterable[Layer], activation_names: Iterable[str] = ()) -> Layout:
        """The layout of ``layers``; statistics live on the first parameter's device."""
        layers = tuple(layers)
        device = layers[0].params[0].device if layers else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        numels = torch.tensor([layer.numel for layer in layers], dtype=torch.float32)
        return cls(layers, device, numels.to(device), tuple(activation_names))

    @property
    def names(self) -> list[str]:
        """Layer names in order."""
        return [layer.name for layer in self.layers]

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.layers)

    @property
    def params(self) -> list[nn.Parameter]:
        """Every watched parameter, layer by layer."""
        return [param for layer in self.layers for param in layer.params]

    def counts(self) -> Counts:
        """The sizes declared state depends on."""
        return Counts(self.num_layers, len(self.activation_names), self.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel``/``DataParallel``/``torch.compile``."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
            continue
        return model


def find_layers(model: nn.Module, params: Iterable[nn.Parameter] | None = None) -> list[Layer]:
    """Groups the trainable parameters of ``model`` into layers, in registration order.

    Args:
        model: The module whose parameters are grouped.
        params: Only these parameters (e.g. one optimizer's); every trainable one when None.
    """
    allowed = None if params is None else {id(param) for param in params}
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        owned = []
        for param in module.parameters(recurse=False):
            if allowed is not None and id(param) not in allowed:
                continue
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                owned.append(param)
        if owned:
            layers.append(Layer(name, module, owned))
    return layers


class ForwardOrder:
    """Records the order in which layers first finish running.

    A layer's position is when its forward first returns, so a module that owns parameters and
    also has children (the root, a custom block) comes after the children it calls. The hooks only
    record (they never remove themselves inside a forward, which ``torch.compile`` could not
    trace); :meth:`finish` reads the order and removes them, between steps.

    Args:
        layers: The layers.
    """

    def __init__(self, layers: Iterable[Layer]) -> None:
        self._order: list[int] = []
        self._seen: set[int] = set()
        self._handles = Handles(self)
        for index, layer in enumerate(layers):
            self._handles.add(
                layer.module.register_forward_hook(ForwardHook(self, ForwardOrder._ran, index))
            )

    def _ran(self, index: int, output: Any) -> None:
        if index not in self._seen:
            self._seen.add(index)
            self._order.append(index)

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._handles)

    @property
    def has_run(self) -> bool:
        """Whether some layer finished a forward."""
        return bool(self._order)

    def finish(self) -> list[int]:
        """Removes the hooks; returns the layer indices in the order they first ran."""
        self._handles.remove()
        return list(self._order)

    def remove(self) -> None:
        """Removes every hook this object installed."""
        self._handles.remove()


def forward_permutation(count: int, ran: list[int]) -> list[int]:
    """Layers that ran, in the order they ran, then the rest in registration order."""
    ran_set = set(ran)
    return list(ran) + [i for i in range(count) if i not in ran_set]
