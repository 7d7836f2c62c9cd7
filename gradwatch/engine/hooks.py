"""Hooks gradwatch registers on a user's modules: weakly bound, and inert in copies.

A model outlives the watch that observes it, and is copied (``copy.deepcopy``, EMA/SWA averaging),
pickled and saved whole (``torch.save(model)``). So every hook gradwatch installs is a small
module-level object that reaches its receiver through a weak reference (the model never keeps a
watch, its tensors or its writer thread alive) and that turns into :class:`InertHook` when copied or
pickled (a copy's forwards never feed the original watch's statistics).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class InertHook:
    """What a gradwatch hook becomes in a copied or unpickled module: it does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class ForwardHook:
    """A forward hook calling ``function(receiver, index, output)`` while the receiver lives.

    Args:
        receiver: The object that collects (held weakly).
        function: An unbound method of the receiver's class.
        index: Passed through: which of the receiver's modules ran.
    """

    def __init__(self, receiver: object, function: Callable[..., None], index: int) -> None:
        self._receiver: Callable[[], object | None] = weakref.ref(receiver)
        self._function = function
        self._index = index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        receiver = self._receiver()
        if receiver is not None:
            try:
                self._function(receiver, self._index, output)
            except Exception as error:  # a hook never breaks the user's forward
                self._failed(error)

    def _failed(self, error: Exception) -> None:
        """Turns this hook off with one warning."""
        self._receiver = _dead
        warnings.warn(
            f"gradwatch: a forward hook failed ({error!r}); it is off, training continues",
            RuntimeWarning,
            stacklevel=3,
        )

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        return InertHook, ()


class ForwardPreHook(ForwardHook):
    """A forward pre-hook calling ``function(receiver, index, args)`` while the receiver lives."""

    def __call__(self, module: nn.Module, args: Any) -> None:  # type: ignore[override]
        receiver = self._receiver()
        if receiver is not None:
            try:
                self._function(receiver, self._index, args)
            except Exception as error:  # a hook never breaks the user's forward
                self._failed(error)


class KwargsPreHook(ForwardHook):
    """A forward pre-hook registered ``with_kwargs=True``: calls
    ``function(receiver, index, (args, kwargs))`` while the receiver lives."""

    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        receiver = self._receiver()
        if receiver is not None:
            try:
                self._function(receiver, self._index, (args, kwargs))
            except Exception as error:  # a hook never breaks the user's forward
                self._failed(error)


def _dead() -> None:
    """What a failed hook's receiver reference returns: nothing, so the hook does nothing."""
    return None


class Handles:
    """The removable handles of one component's hooks.

    Removal happens explicitly (:meth:`remove`) or, at the latest, when the owner is garbage
    collected, so a watch dropped without ``close()`` leaves nothing behind on the model.
    """

    def __init__(self, owner: object) -> None:
        self._handles: list[RemovableHandle] = []
        self._finalizer = weakref.finalize(owner, _remove_all, self._handles)

    def add(self, handle: RemovableHandle) -> None:
        """Keeps ``handle`` for removal."""
        self._handles.append(handle)

    def __bool__(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Removes every hook (safe to call twice)."""
        _remove_all(self._handles)


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
