"""NaN origin: where in a step a NaN/Inf first appeared (the input, the forward pass, the loss or
the backward pass), decided on the device.

An :class:`OriginTracer` hooks the model's root module: a forward pre-hook checks the
floating-point tensors entering the model, a forward hook checks the tensors leaving it (a
``"loss"`` entry of a dict-like output is left to the loss check). With ``modules=True``
(``check_activations=True``) every other module's output is checked too, so the first module in
forward order whose output is non-finite can be named. Each check is one reduction of the tensor
(a sum: NaN and Inf propagate), kept on the device in the order the checks happen; at the step,
one stack of them finds the first non-finite one. Nothing is read on the host.

When the root's forward never runs (a LightningModule whose ``training_step`` calls
``self.net(x)``), the entry points move one level down after two steps: its children are checked
instead, and so on. Only forwards with autograd enabled (training) are checked.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradwatch.engine.hooks import ForwardHook, Handles, KwargsPreHook

_HALF = (torch.float16, torch.bfloat16)
_MAX_ENTRY_DEPTH = 3  # levels below the root searched for the modules the user calls


class Origin(enum.IntEnum):
    """Where a NaN/Inf first appeared in a step (the ``value`` of a NONFINITE alert)."""

    INPUT = 0
    """In the tensors entering the model (the data pipeline)."""
    FORWARD = 1
    """In the output of a module during the forward pass, with finite inputs."""
    LOSS = 2
    """In the loss, with a finite model output."""
    BACKWARD = 3
    """In the gradients, with a finite loss."""

    @property
    def word(self) -> str:
        """The origin as one lowercase word (``"input"``...)."""
        return self.name.lower()


@dataclass(frozen=True)
class ForwardChecks:
    """What the forward passes of one step showed (0-d device tensors), from
    :meth:`OriginTracer.collect`.

    Attributes:
        input_first: bool: a tensor entering the model was non-finite before any checked output was.
        output_bad: bool: some checked output (the model's, or a module's) was non-finite.
        module: long: index into :attr:`OriginTracer.names` of the module whose output was the
            first non-finite one, ``len(names)`` when none was or the input came first.
    """

    input_first: torch.Tensor
    output_bad: torch.Tensor
    module: torch.Tensor


class OriginTracer:
    """Forward hooks that record, on the device, the first non-finite input or output of a step.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> tracer = OriginTracer(model, modules=True)
        >>> _ = model(torch.tensor([[float("nan"), 0.0]], requires_grad=True))
        >>> checks = tracer.collect(torch.device("cpu"))
        >>> bool(checks.input_first), bool(checks.output_bad)
        (True, True)
        >>> tracer.remove()

    Args:
        model: The (unwrapped) model.
        modules: Check every module's output too (else only what enters and leaves the model).

    Attributes:
        names: Every module path of ``model`` (``""`` first, the root); :attr:`ForwardChecks.module`
            indexes it.
    """

    def __init__(self, model: nn.Module, *, modules: bool = False) -> None:
        named = list(model.named_modules())
        self.names: list[str] = [name for name, _ in named]
        self._modules = [module for _, module in named]
        self._input_slot = len(named)
        self._every_module = modules
        self._handles = Handles(self)
        self._entry_handles = Handles(self)
        self._entries = [0]
        self._entry_ran = False
        self._silent_steps = 0  # steps in a row in which no entry module ran
        self._depth = 0
        self._sums: list[torch.Tensor] = []  # one reduction per check event, in event order
        self._slots: list[int] = []  # the module index of each event (the input slot: inputs)
        self._tables: dict[
            tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}
        self._hook_entries()
        if modules:
            for index, module in enumerate(self._modules[1:], start=1):
                hook = ForwardHook(self, OriginTracer._output, index)
                self._handles.add(module.register_forward_hook(hook))

    def _hook_entries(self) -> None:
        self._entry_handles.remove()
        for index in self._entries:
            module = self._modules[index]
            pre = KwargsPreHook(self, OriginTracer._input, index)
            self._entry_handles.add(module.register_forward_pre_hook(pre, with_kwargs=True))
            if index == 0 or not self._every_module:  # else its output is checked already
                post = ForwardHook(self, OriginTracer._output, index)
                self._entry_handles.add(module.register_forward_hook(post))

    def _input(self, index: int, inputs: Any) -> None:
        self._entry_ran = True
        if torch.is_grad_enabled():
            self._event(self._input_slot, _floats(inputs))

    def _output(self, index: int, output: Any) -> None:
        if torch.is_grad_enabled():
            if isinstance(output, Mapping):  # a model output holding its loss: the loss check's
                output = {key: value for key, value in output.items() if key != "loss"}
            self._event(index, _floats(output))

    def _event(self, slot: int, tensors: Iterator[torch.Tensor]) -> None:
        """Records one check: the sum of the tensors (NaN and Inf propagate; a finite sum beyond
        the float range counts as Inf). Two device ops per tensor, nothing read on the host."""
        total: torch.Tensor | None = None
        for tensor in tensors:  # (the event lives where the first tensor is)
            part = tensor.detach().sum(dtype=torch.float32 if tensor.dtype in _HALF else None)
            total = part if total is None else total + part.to(total.device)
        if total is not None:
            self._sums.append(total)
            self._slots.append(slot)

    def collect(self, device: torch.device) -> ForwardChecks | None:
        """This step's checks, then clears them; None if no checked forward ran since.

        When the entry modules never ran since the tracer was built, for two steps in a row (the
        first step's forward may predate the tracer), the next level of modules becomes the entry
        points (see the module docstring).
        """
        sums, slots = self._sums, tuple(self._slots)
        self.clear()
        if not self._entry_ran and self._depth < _MAX_ENTRY_DEPTH:
            self._silent_steps += 1
            if self._silent_steps >= 2:
                self._silent_steps = 0
                self._descend()
        if not sums:
            return None
        order, is_input, is_output, module_of = self._table(slots, device)
        stacked = torch.stack([s if s.device == device else s.to(device) for s in sums])
        bad = (stacked * 0.0) != 0.0  # NaN or Inf
        first = torch.where(bad, order, len(sums)).amin()  # the first bad event (len: none)
        return ForwardChecks(
            input_first=is_input[first],
            output_bad=(bad & is_output).any(),
            module=module_of[first],
        )

    def _table(
        self, slots: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-event lookup tensors for this sequence of events (the same every step, cached):
        event numbers, whether each is an input check (one more entry, False, for "none"),
        whether it is an output check, and the module it names (``len(names)``: none)."""
        table = self._tables.get(slots)
        if table is None:
            modules = len(self.names)
            inputs = [slot == self._input_slot for slot in slots]
            table = (
                torch.arange(len(slots), device=device),
                torch.tensor([*inputs, False], device=device),
                torch.tensor([not i for i in inputs], device=device),
                torch.tensor(
                    [modules if i else slot for slot, i in zip(slots, inputs, strict=True)]
                    + [modules],
                    device=device,
                ),
            )
            if len(self._tables) > 16:  # the sequences of events of a model are few
                self._tables.clear()
            self._tables[slots] = table
        return table

    def clear(self) -> None:
        """Forgets the checks since the last :meth:`collect`."""
        self._sums = []
        self._slots = []

    def _descend(self) -> None:
        """The entry modules never ran: their children become the entry points."""
        index_of = {id(module): index for index, module in enumerate(self._modules)}
        children = [
            index_of[id(child)]
            for entry in self._entries
            for child in self._modules[entry].children()
            if id(child) in index_of
        ]
        if children:
            self._depth += 1
            self._entries = children
            self._hook_entries()

    def remove(self) -> None:
        """Removes every hook this tracer installed."""
        self._handles.remove()
        self._entry_handles.remove()


def _floats(value: Any, depth: int = 3) -> Iterator[torch.Tensor]:
    """The strided floating-point tensors in ``value`` (tensors, sequences, mappings, nested)."""
    if isinstance(value, torch.Tensor):
        if (
            value.is_floating_point()
            and value.layout == torch.strided
            and not value.is_nested
            and value.device.type != "meta"
        ):
            yield value
    elif depth > 0 and isinstance(value, tuple | list):
        for item in value:
            yield from _floats(item, depth - 1)
    elif depth > 0 and isinstance(value, Mapping):
        for item in value.values():
            yield from _floats(item, depth - 1)
