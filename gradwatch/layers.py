"""Layers: modules that directly own trainable parameters, named by path, in forward order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle


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
    """Records the order in which layers first finish running, during the first forward pass.

    A layer's position is when its forward first returns, so a module that owns parameters and
    also has children (the root, a custom block) comes after the children it calls. Hooks are
    installed on construction and removed once the root module's first forward
    returns (or by :meth:`remove`).

    Args:
        root: The unwrapped model.
        layers: Its layers.
        on_done: Called with the layer indices in the order they ran.
    """

    def __init__(
        self, root: nn.Module, layers: list[Layer], on_done: Callable[[list[int]], None]
    ) -> None:
        self._order: list[int] = []
        self._seen: set[int] = set()
        self._on_done = on_done
        self._handles: list[RemovableHandle] = []
        for index, layer in enumerate(layers):
            self._handles.append(layer.module.register_forward_hook(self._ran_hook(index)))
        self._handles.append(root.register_forward_hook(self._root_done))

    def _ran_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if index not in self._seen:
                self._seen.add(index)
                self._order.append(index)

        return hook

    def _root_done(self, module: nn.Module, args: object, output: object) -> None:
        order = list(self._order)
        self.remove()
        if order:
            self._on_done(order)

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._handles)

    def remove(self) -> None:
        """Removes every hook this object installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def forward_permutation(count: int, ran: list[int]) -> list[int]:
    """Layers that ran, in the order they ran, then the rest in registration order."""
    ran_set = set(ran)
    return list(ran) + [i for i in range(count) if i not in ran_set]
