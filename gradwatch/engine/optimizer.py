"""How remedy decisions reach the optimizer: one pair of step hooks per optimizer.

Every watch on an optimizer holds a :class:`StepSource` of that optimizer's one
:class:`StepControl` (two watches on one optimizer, e.g. a notebook cell run twice, compose instead
of corrupting each other). The control registers one step pre-hook and one post-hook, when the
first watch is built. Just before the update, the pre-hook runs the attached watches
(``GradWatch.attach``) and then applies what every source armed for this step:

* **Clipping and skipping, fused path** (fused ``Adam``/``AdamW``/``SGD``, see
  :func:`fused_blocker`): the clip divisor goes into ``optimizer.grad_scale`` (the kernel divides
  every gradient by it) and the skip flag into ``optimizer.found_inf`` (the kernel then leaves
  parameters and state untouched), composed with what a ``GradScaler`` put there (its loss scale is
  multiplied in; flags are combined with ``max`` and clamped to 1, as the kernels skip only on
  exactly 1). No pass over the gradients, no host read. The post-hook puts the exact previous
  attributes back, so ``GradScaler.step`` can delete its own.
* **Skipping, explicit path** (every other optimizer): the flag is read on the host (one read per
  step) and the gradients are dropped, so ``optimizer.step()`` updates nothing. Clipping was applied
  by the watch itself (:func:`clip_`).
* **Learning-rate scale**: when every group's ``lr`` is a tensor (fused/capturable Adam(W), SGD)
  it is multiplied in place on the device and copied back afterwards (no host read); otherwise the
  scale is read on the host once per step and each group's ``lr`` is replaced by a scaled float for
  the update, the exact original object put back afterwards. The stored learning rate is never
  changed, so any LR scheduler composes.

Decisions armed while the optimizer step is under way (Lightning calls the watch from the closure,
after the pre-hooks ran) are applied at once; fused optimizers read the attributes after the
closure. Every decision is consumed by the update it was armed for.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.engine.distributed import is_sharded
from gradwatch.engine.hooks import InertHook
from gradwatch.engine.transfer import to_host

_MISSING = object()
_ATTRIBUTES = ("grad_scale", "found_inf")


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


def fused_blocker(optimizer: torch.optim.Optimizer, watched: list[nn.Parameter]) -> str | None:
    """Why clipping and skipping cannot run inside ``optimizer``'s kernel exactly; None if they can.

    The fused path needs a fused ``Adam``/``AdamW``/``SGD`` in every param group (they honour
    ``grad_scale``/``found_inf``; any other optimizer raises when they are set), updating exactly
    the watched parameters (so both paths clip the same gradients), none of them float64
    (``grad_scale`` is float32: float64 models keep float64-exact clipping on the explicit path) or
    sharded, and no SGD momentum with dampening (a skipped first step cannot be made exact there).
    """
    name = type(optimizer).__name__
    if not owns_step_hooks(optimizer):
        return f"{name} takes no step hooks"
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.SGD) or not getattr(
        optimizer, "_step_supports_amp_scaling", False
    ):
        return f"{name} is not a fused Adam, AdamW or SGD (construct it with fused=True)"
    if not all(group.get("fused") for group in optimizer.param_groups):
        return f"some param groups of {name} are not fused"
    params = [p for p in optimizer_params(optimizer) if p.requires_grad]
    if {id(p) for p in params} != {id(p) for p in watched}:
        return f"{name} does not update exactly the watched parameters"
    if any(p.dtype == torch.float64 for p in params):
        return "the model has float64 parameters (the kernel's grad_scale is float32)"
    if any(is_sharded(p) for p in params):
        return "the parameters are sharded (DTensor)"
    if isinstance(optimizer, torch.optim.SGD) and any(
        group["momentum"] and group["dampening"] for group in optimizer.param_groups
    ):
        return "SGD momentum with dampening (a skipped first step cannot be made exact)"
    return None


def clip_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Applies a clip coefficient to ``grads`` in place, as the fused kernels would (no sync).

    One foreach op per (device, dtype) group: float64 gradients are multiplied by ``coef``
    (numerically ``clip_grad_norm_``), the others divided by the float32 divisor ``1 / coef``
    (what the fused kernels compute with ``grad_scale``: both paths are then bit-identical).
    """
    divisor: torch.Tensor | None = None
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for (device, dtype), members in groups.items():
        if dtype == torch.float64:
            torch._foreach_mul_(members, coef.to(device, dtype))
            continue
        if divisor is None:
            divisor = clip_divisor(coef)
        torch._foreach_div_(members, divisor.to(device))


def clip_divisor(coef: torch.Tensor) -> torch.Tensor:
    """The float32 divisor the kernels (and :func:`clip_`) divide gradients by: ``1 / coef``."""
    return torch.reciprocal(coef.to(torch.float32))


def loss_scale_in_gradients(
    scaler: Any, optimizer: torch.optim.Optimizer | None
) -> torch.Tensor | None:
    """The AMP loss scale still multiplied into the gradients (0-d device tensor), or None.

    That is ``scaler``'s scale while it has not unscaled this optimizer's gradients yet (a fused
    optimizer unscales inside its kernel, so a loop may skip ``scaler.unscale_``). Without a
    scaler, inside the optimizer step: a ``grad_scale`` that ``GradScaler.step`` put on the
    optimizer. Reads the scaler's private state, never the device.
    """
    if optimizer is None:
        return None
    if scaler is not None:
        is_enabled = getattr(scaler, "is_enabled", None)
        scale = getattr(scaler, "_scale", None)
        states = getattr(scaler, "_per_optimizer_states", None)
        if not callable(is_enabled) or not is_enabled() or not isinstance(scale, torch.Tensor):
            return None
        state = states.get(id(optimizer)) if isinstance(states, dict) else None
        stage = getattr(state.get("stage") if state else None, "name", "READY")
        return scale if stage == "READY" else None
    control = _CONTROLS.get(optimizer)
    if control is not None and control.in_step:
        return control.foreign_grad_scale()
    return None


class StepSource:
    """One watch's part in its optimizer's :class:`StepControl`.

    Attributes:
        before_step: Called first thing in every optimizer step pre-hook (``GradWatch.attach``).
    """

    def __init__(self, control: StepControl) -> None:
        self.before_step: Callable[[], None] | None = None
        self._control = control
        self.decision = _Armed()

    def arm(
        self,
        *,
        divisor: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
        fused: bool = False,
        lr_scale: torch.Tensor | float | None = None,
    ) -> None:
        """Sets what the next update applies (replacing what was armed); inside the optimizer
        step it applies at once.

        Args:
            divisor: 0-d float32 device divisor of every gradient (fused path only).
            skip: 0-d device bool: the update must not happen.
            fused: Apply ``skip`` through ``found_inf`` (no host read) instead of dropping the
                gradients.
            lr_scale: Factor on every learning rate for the update.
        """
        self.decision = _Armed(divisor, skip, fused, lr_scale)
        self._control.reapply()

    @property
    def in_step(self) -> bool:
        """Whether the optimizer step is under way (between its pre- and post-hook)."""
        return self._control.in_step

    def close(self) -> None:
        """Stops contributing; the last source to close removes the hooks."""
        self.decision = _Armed()
        self.before_step = None
        self._control.release(self)


@dataclass(frozen=True)
class _Armed:
    divisor: torch.Tensor | None = None
    skip: torch.Tensor | None = None
    fused: bool = False
    lr_scale: torch.Tensor | float | None = None


@dataclass
class _Applied:
    """What the pre-hook changed on the optimizer, for the post-hook to put back."""

    attributes: dict[str, Any] = field(default_factory=dict)  # name -> previous value
    ours: dict[str, Any] = field(default_factory=dict)  # name -> the value we set
    lrs: list[tuple[dict[str, Any], Any, Any]] = field(default_factory=list)  # group, saved, set


class StepControl:
    """The step hooks of one optimizer (see the module docstring).

    Args:
        optimizer: The optimizer (held weakly).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._sources: weakref.WeakSet[StepSource] = weakref.WeakSet()
        self._applied: _Applied | None = None
        self._prefilled = False
        self._warned = False
        self._handles = [
            optimizer.register_step_pre_hook(_StepHook(self, StepControl._before)),
            optimizer.register_step_post_hook(_StepHook(self, StepControl._after)),
        ]

    @property
    def in_step(self) -> bool:
        """Whether the optimizer step is under way (between the pre- and the post-hook)."""
        return self._applied is not None

    def add_source(self) -> StepSource:
        """A new contributor (one per watch)."""
        source = StepSource(self)
        self._sources.add(source)
        return source

    def release(self, source: StepSource) -> None:
        """Removes ``source``; with none left, restores the optimizer and removes the hooks."""
        self._sources.discard(source)
        if not len(self._sources):
            self._restore()
            for handle in self._handles:
                handle.remove()
            optimizer = self._optimizer()
            if optimizer is not None:
                _CONTROLS.pop(optimizer, None)

    def reapply(self) -> None:
        """Puts the current decisions in place if the optimizer step is under way."""
        optimizer = self._optimizer()
        if optimizer is not None and self._applied is not None:
            self._restore()
            self._apply(optimizer)

    def foreign_grad_scale(self) -> torch.Tensor | None:
        """The ``grad_scale`` someone else (``GradScaler.step``) set before this step."""
        if self._applied is None:
            return None
        optimizer = self._optimizer()
        if "grad_scale" in self._applied.attributes:  # ours is on the optimizer now
            value = self._applied.attributes["grad_scale"]
        else:
            value = optimizer.__dict__.get("grad_scale") if optimizer is not None else None
        return value if isinstance(value, torch.Tensor) else None

    # ------------------------------------------------------------------ the hooks

    def _before(self) -> None:
        optimizer = self._optimizer()
        if optimizer is None:
            return
        if self._applied is not None:  # the previous step raised before its post-hook
            self._recover(optimizer)
        sources = list(self._sources)
        for source in sources:
            if source.before_step is not None:
                source.before_step()
        self._apply(optimizer)

    def _after(self) -> None:
        self._restore()
        for source in list(self._sources):
            source.decision = _Armed()

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        applied = _Applied()
        self._applied = applied
        divisor, fused_skip, host_skip, lr_scale = _combine(
            [s.decision for s in list(self._sources)]
        )
        if fused_skip is not None and not self._prefilled:
            self._prefilled = _prefill_sgd_momentum(optimizer)
        if divisor is not None:
            previous = optimizer.__dict__.get("grad_scale", _MISSING)
            applied.attributes["grad_scale"] = previous
            if isinstance(previous, torch.Tensor):  # GradScaler.step: the loss scale is in there
                divisor = previous * divisor.to(previous.device)
            optimizer.grad_scale = applied.ours["grad_scale"] = divisor  # type: ignore[attr-defined]
        if fused_skip is not None:
            previous = optimizer.__dict__.get("found_inf", _MISSING)
            applied.attributes["found_inf"] = previous
            flag = fused_skip.to(torch.float32)
            if isinstance(previous, torch.Tensor):
                # The kernels skip only on found_inf == 1.0 exactly and Adam subtracts it from
                # its step counts: combine with max and clamp, never add.
                flag = torch.maximum(previous, flag.to(previous.device)).clamp(max=1.0)
            optimizer.found_inf = applied.ours["found_inf"] = flag  # type: ignore[attr-defined]
        groups = [group for group in optimizer.param_groups if "lr" in group]
        if lr_scale is not None and len(groups) < len(optimizer.param_groups) and not self._warned:
            self._warned = True
            warnings.warn(
                "gradwatch: some param groups of the optimizer have no 'lr'; LRBackoff leaves "
                "them alone",
                RuntimeWarning,
                stacklevel=2,
            )
        lr_on_device = bool(groups) and all(isinstance(g["lr"], torch.Tensor) for g in groups)
        # The explicit path's one host read per step: the skip flag and/or the LR scale together.
        read_lr = isinstance(lr_scale, torch.Tensor) and not lr_on_device
        read = [t for t in (host_skip, lr_scale if read_lr else None) if t is not None]
        values = [float(v) for v in to_host([t.double() for t in read])] if read else []
        skip_now = bool(values[0]) if host_skip is not None else False
        if read_lr:
            lr_scale = values[-1]
        if skip_now:
            drop_gradients(optimizer_params(optimizer))
        if lr_scale is not None:
            applied.lrs = _scale_lrs(groups, lr_scale)

    def _restore(self) -> None:
        """Puts back everything :meth:`_apply` changed; the step is over."""
        applied, self._applied = self._applied, None
        optimizer = self._optimizer()
        if applied is None or optimizer is None:
            return
        for name, previous in applied.attributes.items():
            if previous is _MISSING:
                optimizer.__dict__.pop(name, None)
            else:
                setattr(optimizer, name, previous)
        for group, saved, current in applied.lrs:
            if isinstance(saved, torch.Tensor) and saved is not current:
                current.copy_(saved)
            else:
                group["lr"] = saved

    def _recover(self, optimizer: torch.optim.Optimizer) -> None:
        """Undoes what a step that raised between the hooks left on the optimizer.

        When a ``GradScaler.step`` ran since, it multiplied our stale ``grad_scale`` into its own
        and replaced ``found_inf``: divide the stale value back out (exact, as the scaler's factor
        is a power of two) and leave the scaler's attributes, which it deletes itself.
        """
        applied = self._applied
        assert applied is not None
        for name in _ATTRIBUTES:
            current = optimizer.__dict__.get(name, _MISSING)
            ours = applied.ours.get(name, _MISSING)
            if ours is not _MISSING and current is not ours:
                applied.attributes.pop(name, None)  # not ours any more: leave it there
                if name == "grad_scale" and isinstance(current, torch.Tensor):
                    optimizer.grad_scale = current / ours.to(current.device)  # type: ignore[attr-defined]
        self._restore()


def _combine(
    decisions: list[_Armed],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, Any]:
    """The product of divisors, the fused and host skip flags OR-ed, the product of LR scales."""
    divisor = fused_skip = host_skip = None
    lr_scale: Any = None
    for decision in decisions:
        if decision.divisor is not None:
            divisor = decision.divisor if divisor is None else divisor * decision.divisor
        if decision.skip is not None:
            if decision.fused:
                fused_skip = decision.skip if fused_skip is None else fused_skip | decision.skip
            else:
                host_skip = decision.skip if host_skip is None else host_skip | decision.skip
        if decision.lr_scale is not None:
            lr_scale = decision.lr_scale if lr_scale is None else lr_scale * decision.lr_scale
    return divisor, fused_skip, host_skip, lr_scale


def _scale_lrs(groups: list[dict[str, Any]], scale: Any) -> list[tuple[dict[str, Any], Any, Any]]:
    """Scales every group's learning rate for this update; returns what to put back.

    A device ``scale`` scales tensor learning rates in place (same tensors, no host read); a
    number replaces each ``lr`` by a scaled copy.
    """
    if isinstance(scale, torch.Tensor):
        saved = []
        for group in groups:
            lr = group["lr"]
            saved.append((group, lr.clone(), lr))
            lr.mul_(scale.to(lr.device, lr.dtype))
        return saved
    saved = [(group, group["lr"], group["lr"]) for group in groups]
    if scale != 1.0:
        for group in groups:
            group["lr"] = group["lr"] * scale
    return saved


def _prefill_sgd_momentum(optimizer: torch.optim.Optimizer) -> bool:
    """Works around fused SGD's momentum when its first step is skipped by ``found_inf``.

    ``torch.optim.sgd._fused_sgd`` creates missing momentum buffers with ``torch.empty_like``
    before the kernel runs; a skipped kernel leaves them uninitialised in the state and the next
    step blends that memory in (GradScaler's own first-step overflow hits it too). With
    ``dampening == 0`` (:func:`fused_blocker` requires it) a zero buffer is exactly "no buffer
    yet" (``momentum * 0 + g == g``), so missing buffers are zero-filled before the first step.
    Returns True once done.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    for group in optimizer.param_groups:
        if not group["momentum"]:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
    return True


_CONTROLS: weakref.WeakKeyDictionary[torch.optim.Optimizer, StepControl] = (
    weakref.WeakKeyDictionary()
)


def step_source(optimizer: torch.optim.Optimizer) -> StepSource:
    """A new source on ``optimizer``'s shared :class:`StepControl` (created on first use)."""
    control = _CONTROLS.get(optimizer)
    if control is None:
        control = _CONTROLS[optimizer] = StepControl(optimizer)
    return control.add_source()


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
