"""Layers: modules that directly own trainable parameters, named by path, in forward order."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import nn

from gradwatch.engine.hooks import ForwardHook, Handles
from gradwatch.engine.state import Counts
from gradwatch.engine.text import display_name

Pattern: TypeAlias = "str | re.Pattern[str]"
NamePatterns: TypeAlias = "Pattern | Sequence[Pattern] | None"


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
        modules: Every module path of the model (``""`` first), as the NaN origin tracer indexes
            them.
    """

    layers: tuple[Layer, ...]
    device: torch.device
    numels: torch.Tensor = field(repr=False)
    activation_names: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        layers: Iterable[Layer],
        activation_names: Iterable[str] = (),
        modules: Iterable[str] = (),
    ) -> Layout:
        """The layout of ``layers``; statistics live on the first parameter's device."""
        layers = tuple(layers)
        device = layers[0].params[0].device if layers else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        numels = torch.tensor([layer.numel for layer in layers], dtype=torch.float32)
        return cls(layers, device, numels.to(device), tuple(activation_names), tuple(modules))

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


def check_patterns(name: str, value: object) -> tuple[Pattern, ...] | None:
    """``value`` (None, a glob string, a compiled regex, or a sequence of them) as a tuple.

    Raises:
        TypeError: Naming the argument and the value that is not a pattern.
    """
    if value is None:
        return None
    items = (value,) if isinstance(value, str | re.Pattern) else value
    if not isinstance(items, Sequence):
        raise TypeError(
            f"{name} must be a glob string, a compiled re.Pattern, a sequence of them or None, "
            f"got {value!r}"
        )
    for index, item in enumerate(items):
        if not isinstance(item, str | re.Pattern):
            raise TypeError(
                f"{name}[{index}] must be a glob string or a compiled re.Pattern, got {item!r}"
            )
    return tuple(items)


def matches(pattern: Pattern, layer: str) -> bool:
    """Whether a layer name matches: a string is a glob over the whole name, a ``re.Pattern`` is
    searched in it; the root layer ``""`` also matches as ``"<root>"``.

    Example:
        >>> matches("encoder.*", "encoder.0.fc"), matches(re.compile("fc$"), "encoder.0.fc")
        (True, True)
    """
    names = {layer, display_name(layer)}
    if isinstance(pattern, str):
        return any(fnmatch.fnmatchcase(name, pattern) for name in names)
    return any(pattern.search(name) is not None for name in names)


def select_layers(
    layers: list[Layer],
    include: Sequence[Pattern] | None,
    exclude: Sequence[Pattern] | None,
) -> tuple[list[Layer], list[str]]:
    """The layers ``include`` selects and ``exclude`` leaves in, and the patterns (as
    ``"include[0] 'x*'"``) that matched no layer at all."""
    unused: list[str] = []
    selected = list(layers)
    for argument, patterns in (("include", include), ("exclude", exclude)):
        if patterns is None:
            continue
        matched: set[int] = set()
        for index, pattern in enumerate(patterns):
            hit = {id(layer) for layer in layers if matches(pattern, layer.name)}
            if not hit:
                unused.append(f"{argument}[{index}] {pattern!r}")
            matched |= hit
        wanted = argument == "include"
        selected = [layer for layer in selected if (id(layer) in matched) == wanted]
    return selected, unused


class ForwardOrder:
    """Records the order in which layers first finish running.

    A layer's position is when its forward first returns, so a module that owns parameters and
    also has children (the root, a custom block) comes after the children it calls. The hooks only
    record (they never remove themselves inside a forward, which ``torch.compile`` could not
    trace); :meth:`finish` reads the order and removes them, between steps. The order counts as
    known once a forward of the root module has returned (so a read from another thread while the
    first forward runs does not freeze half an order).

    Args:
        layers: The layers.
        root: The model they belong to.
    """

    def __init__(self, layers: Iterable[Layer], root: nn.Module) -> None:
        self._order: list[int] = []
        self._seen: set[int] = set()
        self._complete = False
        self._handles = Handles(self)
        for index, layer in enumerate(layers):
            self._handles.add(
                layer.module.register_forward_hook(ForwardHook(self, ForwardOrder._ran, index))
            )
        self._handles.add(root.register_forward_hook(ForwardHook(self, ForwardOrder._root_ran, 0)))

    def _ran(self, index: int, output: Any) -> None:
        if index not in self._seen:
            self._seen.add(index)
            self._order.append(index)

    def _root_ran(self, index: int, output: Any) -> None:
        self._complete = True

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._handles)

    @property
    def has_run(self) -> bool:
        """Whether a forward of the whole model finished."""
        return self._complete

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


def merge_order(previous: list[str], layers: list[Layer]) -> list[Layer]:
    """``layers`` (registration order) in the order of the ``previous`` layer names.

    A layer known by name keeps its place; a new one goes right after the layer registered before
    it (its forward position is unknown until a forward runs).
    """
    position = {name: index for index, name in enumerate(previous)}
    anchor = -1
    keys: list[tuple[int, int]] = []
    for index, layer in enumerate(layers):
        if layer.name in position:
            anchor = position[layer.name]
            keys.append((anchor, -1))
        else:
            keys.append((anchor, index))
    return [layer for _, layer in sorted(zip(keys, layers, strict=True), key=lambda kv: kv[0])]


@dataclass(frozen=True)
class Structure:
    """What a layout was built from, to notice when the model changes after construction.

    Compares the identity of every layer's module and parameters (a replaced layer, an added
    module, unfrozen parameters, parameters re-created by ``to_empty()`` or
    ``load_state_dict(assign=True)``) and each parameter's device, dtype and shape, plus the hooked
    activation modules. It holds the objects themselves so that their ids stay unique while it
    lives.

    Attributes:
        key: What is compared.
        objects: The modules and parameters the key names (kept alive, not compared).
    """

    key: tuple[Any, ...]
    objects: tuple[Any, ...] = field(compare=False, repr=False)

    @classmethod
    def of(cls, layers: Iterable[Layer], activations: Iterable[nn.Module] = ()) -> Structure:
        """The structure of ``layers`` and of the hooked ``activations`` modules."""
        key: list[Any] = []
        objects: list[Any] = []
        for layer in layers:
            params = tuple((id(p), p.device, p.dtype, tuple(p.shape)) for p in layer.params)
            key.append((layer.name, id(layer.module), params))
            objects += [layer.module, *layer.params]
        for module in activations:
            key.append(id(module))
            objects.append(module)
        return cls(tuple(key), tuple(objects))

    def layer_changes(self, newer: Structure) -> tuple[list[str], list[str], list[str]]:
        """Layer names added, removed and changed (another module, other parameters, or a
        parameter's device, dtype or shape) in ``newer``."""
        old = {entry[0]: entry for entry in self.key if isinstance(entry, tuple)}
        new = {entry[0]: entry for entry in newer.key if isinstance(entry, tuple)}
        changed = [name for name in new if name in old and new[name] != old[name]]
        return sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys()), sorted(changed)
