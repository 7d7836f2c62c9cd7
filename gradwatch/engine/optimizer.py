"""How remedy decisions reach the optimizer: a learning-rate scale around its step, skipped updates.

The learning-rate scale is applied by optimizer step hooks that multiply each group's ``lr`` just
before the update and put the exact original object back just after, so the stored learning rate
is never changed and any LR scheduler composes. One :class:`LRScaling` per optimizer, shared by
every watch on it: their scales multiply, and the original value is restored exactly once (two
watches on one optimizer, e.g. a notebook cell run twice, compose instead of corrupting it).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from gradwatch.engine.hooks import InertHook


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer that really steps, inside wrappers that forward ``step`` to it.

    Looks through ``_optimizer`` (Lightning's ``LightningOptimizer``, Fabric's optimizer) and,
    when the outer object owns no step hooks (``torch.optim.Optimizer.__init__`` never ran on it),
    through ``optimizer`` (Accelerate's ``AcceleratedOptimizer``) and ``optim``
    (``PostLocalSGDOptimizer``). A real optimizer that holds another one
    (``ZeroRedundancyOptimizer``, lookahead-style optimizers) owns its hooks and is kept.
    """
    for _ in range(8):  # wrappers of wrappers, never a cycle
        attributes = getattr(optimizer, "__dict__", {})
        inner = attributes.get("_optimizer")
        if not isinstance(inner, torch.optim.Optimizer) and not owns_step_hooks(optimizer):
            inner = attributes.get("optimizer", attributes.get("optim"))
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def owns_step_hooks(optimizer: Any) -> bool:
    """Whether ``optimizer`` can take step hooks (``torch.optim.Optimizer.__init__`` ran on it)."""
    return "_optimizer_step_pre_hooks" in getattr(optimizer, "__dict__", {})


def check_step_hooks(optimizer: Any, needed_by: str) -> None:
    """Raises a TypeError naming ``needed_by`` when ``optimizer`` cannot take step hooks."""
    if not owns_step_hooks(optimizer):
        raise TypeError(
            f"{needed_by} needs optimizer step hooks, and {type(optimizer).__name__} has none "
            "(torch.optim.Optimizer.__init__ never ran on it, nor on an optimizer inside it): "
            "pass the torch optimizer that performs the update (DeepSpeed's ZeRO optimizers are "
            "not supported)"
        )


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter the optimizer updates, group by group."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def drop_gradients(params: list[nn.Parameter]) -> None:
    """Enforces a skipped update: optimizers leave parameters without a gradient untouched."""
    for param in params:
        param.grad = None


class ScaleSource:
    """One watch's learning-rate scale on a shared :class:`LRScaling`.

    Attributes:
        scale: The factor this watch wants for the next update (1.0: none).
    """

    def __init__(self, scaling: LRScaling) -> None:
        self.scale = 1.0
        self._scaling = scaling

    def set(self, scale: float) -> None:
        """Sets the scale; inside ``optimizer.step`` (Lightning's closure) it applies at once."""
        self.scale = scale
        self._scaling.reapply()

    def close(self) -> None:
        """Stops contributing; the last source to close removes the hooks."""
        self.scale = 1.0
        self._scaling.release(self)


class LRScaling:
    """The learning-rate scaling hooks of one optimizer (see the module docstring).

    Args:
        optimizer: The optimizer (held weakly).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        check_step_hooks(optimizer, "LRBackoff (a learning-rate remedy)")
        self._optimizer = weakref.ref(optimizer)
        self._sources: weakref.WeakSet[ScaleSource] = weakref.WeakSet()
        self._saved: list[tuple[dict[str, Any], Any]] | None = None
        self._warned = False
        self._handles = [
            optimizer.register_step_pre_hook(_StepHook(self, LRScaling._apply)),
            optimizer.register_step_post_hook(_StepHook(self, LRScaling._restore)),
        ]

    def add_source(self) -> ScaleSource:
        """A new contributor (one per watch)."""
        source = ScaleSource(self)
        self._sources.add(source)
        return source

    def release(self, source: ScaleSource) -> None:
        """Removes ``source``; with none left, restores the learning rates and removes the hooks."""
        self._sources.discard(source)
        if not len(self._sources):
            self._restore()
            for handle in self._handles:
                handle.remove()
            optimizer = self._optimizer()
            if optimizer is not None:
                _SCALINGS.pop(optimizer, None)

    def reapply(self) -> None:
        """Puts the current product of scales in place if the optimizer step is under way."""
        if self._saved is not None:
            self._apply()

    def _apply(self) -> None:
        """Remembers every group's learning rate and multiplies it by the product of scales."""
        optimizer = self._optimizer()
        if optimizer is None:
            return
        self._restore()
        scale = 1.0
        for source in list(self._sources):
            scale *= source.scale
        groups = [group for group in optimizer.param_groups if "lr" in group]
        if len(groups) < len(optimizer.param_groups) and not self._warned:
            self._warned = True
            warnings.warn(
                "gradwatch: some param groups of the optimizer have no 'lr'; LRBackoff leaves "
                "them alone",
                RuntimeWarning,
                stacklevel=2,
            )
        self._saved = [(group, group["lr"]) for group in groups]
        if scale != 1.0:
            for group, lr in self._saved:
                group["lr"] = lr * scale

    def _restore(self) -> None:
        """Puts back the exact learning-rate objects remembered by :meth:`_apply`."""
        if self._saved is None:
            return
        for group, lr in self._saved:
            group["lr"] = lr
        self._saved = None


_SCALINGS: weakref.WeakKeyDictionary[torch.optim.Optimizer, LRScaling] = weakref.WeakKeyDictionary()


def lr_scaling(optimizer: torch.optim.Optimizer) -> ScaleSource:
    """A learning-rate scale source on ``optimizer``'s shared :class:`LRScaling`."""
    scaling = _SCALINGS.get(optimizer)
    if scaling is None:
        scaling = _SCALINGS[optimizer] = LRScaling(optimizer)
    return scaling.add_source()


class _StepHook:
    """An optimizer step hook calling ``function(receiver)``; inert once copied or pickled."""

    def __init__(self, receiver: object, function: Any) -> None:
        self._receiver = weakref.ref(receiver)
        self._function = function

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        receiver = self._receiver()
        if receiver is not None:
            self._function(receiver)

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        return InertHook, ()
