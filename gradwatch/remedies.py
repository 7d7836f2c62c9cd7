"""Remedies: act on the gradients or the update of a step, in the order given.

Each remedy sees the step after the previous ones acted (``obs.total_now``, ``obs.norms_now``).
The clipping remedies (:class:`ClipNorm`, :class:`AutoClip`, :class:`ZClip`, :class:`AGC`) work on
the device only: their coefficients are computed and clamped there and multiplied in
unconditionally, like ``torch.nn.utils.clip_grad_norm_``, so they add no host synchronisation.
:class:`LRBackoff` and :class:`SkipStep` decide on the host and read this step's detection flags
with one small transfer per step (shared between them).

Example:
    >>> import torch, gradwatch as gw
    >>> model = torch.nn.Linear(4, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> watch = gw.GradWatch(model, optimizer, remedies=[gw.AutoClip(), gw.LRBackoff()])
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch.alerts import AlertKind
from gradwatch.distributed import local_part
from gradwatch.step import StepObservation, WatchContext
from gradwatch.validation import check_int, check_names, check_number

# ``torch.nn.utils.clip_grad_norm_`` divides by ``total_norm + 1e-6``; so do the norm clippers.
_CLIP_EPS = 1e-6
# AutoClip(window=None) keeps the whole history up to this many most recent steps (40 kB).
AUTOCLIP_MAX_HISTORY = 10_000
_AGC_EXCLUSIONS = ("final", "vectors")
_TRIGGERS = {
    "nonfinite": AlertKind.NONFINITE,
    "spike": AlertKind.SPIKE,
    "exploding": AlertKind.EXPLODING,
}


class Remedy:
    """Base class of every remedy.

    Attributes:
        needs_optimizer: The remedy acts on the optimizer (``GradWatch`` requires one).
    """

    needs_optimizer: ClassVar[bool] = False

    def bind(self, context: WatchContext) -> None:
        """Called once when the watch knows its layers; create device state and hooks here."""
        self.context = context

    def apply(self, obs: StepObservation) -> None:
        """Acts on one step: scale gradients, set ``obs.lr_scale`` or ``obs.skip``."""
        raise NotImplementedError

    def detach(self) -> None:
        """Removes any hook the remedy installed."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-value state (floats, ints, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (after :meth:`bind`)."""


class ClipNorm(Remedy):
    """Fixed total-norm clipping, numerically ``torch.nn.utils.clip_grad_norm_``.

    Reuses the total L2 norm the probe already measured (no second pass over the gradients):
    ``coef = clamp(max_norm / (total_norm + 1e-6), max=1)``, computed on the device and multiplied
    into every gradient. No host synchronisation.

    Example:
        >>> clip = ClipNorm(max_norm=1.0)

    Args:
        max_norm: Largest total gradient norm allowed; > 0.
        norm_type: Only ``2.0`` (the norm the probe measures).

    Raises:
        ValueError: ``max_norm`` not positive and finite, or ``norm_type`` other than 2.
    """

    clips: ClassVar[bool] = True

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = check_number("max_norm", max_norm, low=0.0)
        norm = check_number("norm_type", norm_type, low=0.0, finite=False)
        if norm != 2.0:
            raise ValueError(
                f"norm_type must be 2.0 (ClipNorm reuses the L2 norms gradwatch measures), "
                f"got {norm_type!r}"
            )

    def apply(self, obs: StepObservation) -> None:
        """Scales the gradients so that their total norm is at most ``max_norm``."""
        coef = (self.max_norm / (_total_now(obs) + _CLIP_EPS)).clamp(max=1.0)
        obs.scale_grads(coef)


class AutoClip(Remedy):
    """Clips the total norm to a percentile of the norms seen so far (Seetharaman et al., 2020).

    Each step appends the observed total norm (after earlier remedies) to the history, then clips
    to the ``percentile``-th percentile of the history (linear interpolation, as
    ``numpy.percentile``). Non-finite steps (and AMP overflow steps) never enter the history and are
    not clipped.

    The history lives on the device: the last ``window`` steps, or with ``window=None`` the whole
    run up to the most recent ``AUTOCLIP_MAX_HISTORY`` (10,000) steps. The percentile is found with
    one partial sort (``torch.topk`` of the smallest ``percentile``% of the history) per step; no
    host synchronisation.

    Example:
        >>> clip = AutoClip(percentile=10.0, window=1000)

    Args:
        percentile: Percentile of the history to clip to, in (0, 100].
        window: Steps of history kept (>= 1), or None for the whole run (capped as above).

    Raises:
        ValueError: ``percentile`` outside (0, 100] or ``window`` < 1.
    """

    clips: ClassVar[bool] = True

    def __init__(self, percentile: float = 10.0, window: int | None = None) -> None:
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0)
        if window is not None:
            check_int("window", window, minimum=1)
        self.window = window
        self.capacity = window if window is not None else AUTOCLIP_MAX_HISTORY
        self._written = 0

    def bind(self, context: WatchContext) -> None:
        """Allocates the history ring on the watch's device."""
        super().bind(context)
        # +inf marks an empty slot or a step left out (it sorts after every real norm).
        self._norms = torch.full((self.capacity,), math.inf, device=context.device)
        self._written = 0

    def apply(self, obs: StepObservation) -> None:
        """Records this step's total norm and clips to the percentile of the history."""
        total = _total_now(obs)
        valid = obs.valid & torch.isfinite(total)
        self._norms[self._written % self.capacity].copy_(torch.where(valid, total, math.inf))
        self._written += 1
        threshold = self._threshold()
        coef = (threshold / (total + _CLIP_EPS)).clamp(max=1.0)
        obs.scale_grads(torch.where(valid, coef, 1.0))

    def _threshold(self) -> torch.Tensor:
        """The percentile of the recorded finite norms, +inf while there is none (on device)."""
        size = min(self._written, self.capacity)
        history = self._norms[:size]
        fraction = self.percentile / 100.0
        # Among ``count <= size`` finite norms the percentile sits at rank
        # ``fraction * (count - 1)``, so the ``floor(fraction * (size - 1)) + 2`` smallest entries
        # always contain it.
        keep = min(size, math.floor(fraction * (size - 1)) + 2)
        smallest = torch.topk(history, keep, largest=False, sorted=True).values
        count = torch.isfinite(history).sum()
        rank = fraction * (count - 1).clamp(min=0).double()
        lower = rank.floor()
        below = smallest[lower.long().clamp(max=keep - 1)]
        above = smallest[(lower.long() + 1).clamp(max=(count - 1).clamp(min=0)).clamp(max=keep - 1)]
        weight = (rank - lower).float()
        return torch.where(weight > 0, below + (above - below) * weight, below)

    def state_dict(self) -> dict[str, Any]:
        """The history, oldest first (``inf`` marks steps left out)."""
        if not hasattr(self, "_norms"):
            return {"norms": []}
        size = min(self._written, self.capacity)
        start = self._written % self.capacity if self._written > self.capacity else 0
        ordered = torch.cat([self._norms[start:size], self._norms[:start]])
        return {"norms": [float(v) for v in ordered.cpu().tolist()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the history (the most recent ``capacity`` entries)."""
        norms = list(state.get("norms", []))[-self.capacity :]
        self._norms.fill_(math.inf)
        if norms:
            self._norms[: len(norms)].copy_(torch.tensor(norms, dtype=torch.float32))
        self._written = len(norms)


class ZClip(Remedy):
    """Z-score clipping against an EMA of the total norm (Kumar et al., 2025).

    For the first ``warmup_steps`` valid steps nothing is clipped; their mean and (population)
    variance initialise the statistics. Afterwards, with ``z = (g - mean) / (std + eps)`` for the
    total norm ``g``, a step with ``z > z_thresh`` is clipped to the paper's reciprocal
    ("adaptive scaling") threshold ``mean + z_thresh**2 / z * std``: the larger the outlier, the
    closer to the mean it is cut. The EMAs are then updated with the clipped norm
    (``mean <- alpha*mean + (1-alpha)*g'``, ``var <- alpha*var + (1-alpha)*(g' - mean)**2``).
    Calm steps are left exactly as they are; non-finite steps are neither clipped nor counted.
    Everything stays on the device: no host synchronisation.

    Example:
        >>> clip = ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25)

    Args:
        alpha: EMA smoothing factor, in (0, 1).
        z_thresh: z-score above which a step is clipped; > 0.
        warmup_steps: Valid steps used to initialise mean and variance; >= 1.
        eps: Added to the standard deviation in the z-score; > 0.

    Raises:
        ValueError: An argument outside its range.
    """

    clips: ClassVar[bool] = True

    def __init__(
        self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6
    ) -> None:
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, high_open=True)
        self.z_thresh = check_number("z_thresh", z_thresh, low=0.0)
        check_int("warmup_steps", warmup_steps, minimum=1)
        self.warmup_steps = warmup_steps
        self.eps = check_number("eps", eps, low=0.0)

    def bind(self, context: WatchContext) -> None:
        """Creates the running statistics on the watch's device."""
        super().bind(context)
        self._mean = torch.zeros((), device=context.device)
        self._var = torch.zeros((), device=context.device)
        self._count = torch.zeros((), device=context.device)  # valid warm-up steps seen

    def apply(self, obs: StepObservation) -> None:
        """Clips an outlier step back toward the running mean and updates the statistics."""
        norm = _total_now(obs)
        valid = obs.valid & torch.isfinite(norm)
        mean, var, count = self._mean, self._var, self._count
        warming = count < self.warmup_steps
        std = var.sqrt()
        z = (norm - mean) / (std + self.eps)
        spike = valid & ~warming & (z > self.z_thresh)
        threshold = mean + (self.z_thresh**2) * std / z
        obs.scale_grads(torch.where(spike, threshold / (norm + _CLIP_EPS), 1.0))

        clipped = torch.where(spike, threshold, norm)
        seen = count + 1  # warm-up: running population mean and variance (Welford)
        delta = norm - mean
        warm_mean = mean + delta / seen
        warm_var = (var * count + delta * (norm - warm_mean)) / seen
        ema_mean = self.alpha * mean + (1.0 - self.alpha) * clipped
        ema_var = self.alpha * var + (1.0 - self.alpha) * (clipped - ema_mean).square()
        self._mean = torch.where(valid, torch.where(warming, warm_mean, ema_mean), mean)
        self._var = torch.where(valid, torch.where(warming, warm_var, ema_var), var)
        self._count = torch.where(valid & warming, seen, count)

    def state_dict(self) -> dict[str, Any]:
        """Mean, variance and the number of warm-up steps seen."""
        if not hasattr(self, "_mean"):
            return {}
        return {
            "mean": float(self._mean),
            "var": float(self._var),
            "count": int(self._count),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the running statistics."""
        device = self._mean.device
        self._mean = torch.tensor(float(state.get("mean", 0.0)), device=device)
        self._var = torch.tensor(float(state.get("var", 0.0)), device=device)
        self._count = torch.tensor(float(state.get("count", 0)), device=device)


class AGC(Remedy):
    """Unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets).

    For every parameter, each output unit (a slice along dim 0: a row of a Linear weight, a filter
    of a Conv weight) has its gradient norm limited to ``clipping * max(||w_unit||, eps)``:
    ``g_unit <- g_unit * max_norm / max(||g_unit||, 1e-6)`` when ``||g_unit|| > max_norm``, as the
    reference implementation. Vectors and scalars (biases, normalisation gains) count as one unit,
    as in the reference. The paper leaves the final (classifier) layer unclipped; so does the
    default ``exclude=("final",)``; add ``"vectors"`` to leave every 1-d parameter alone too.

    The coefficient reported as ``clip_coef`` is the ratio of total norms after/before AGC.
    Gradients are rescaled with one ``_foreach_mul_``; the unit norms are computed per parameter,
    on the device (no host synchronisation). With sharded parameters each rank clips the units it
    holds (exact for dim-0 sharding, as FSDP2 uses).

    Example:
        >>> agc = AGC(clipping=0.01, exclude=("final", "vectors"))

    Args:
        clipping: The clipping factor λ; > 0.
        eps: Floor of the weight unit norm (so zero-initialised weights can still move); > 0.
        exclude: Parameters left unclipped: ``"final"`` (the last layer in forward order) and/or
            ``"vectors"`` (every parameter with at most one dimension).

    Raises:
        ValueError: ``clipping``/``eps`` not positive, or an unknown ``exclude`` name.
    """

    clips: ClassVar[bool] = True

    def __init__(
        self, clipping: float = 0.01, eps: float = 1e-3, exclude: Collection[str] = ("final",)
    ) -> None:
        self.clipping = check_number("clipping", clipping, low=0.0)
        self.eps = check_number("eps", eps, low=0.0)
        self.exclude = check_names("exclude", exclude, _AGC_EXCLUSIONS, allow_empty=True)
        self._excluded: set[int] = set()

    def bind(self, context: WatchContext) -> None:
        """Finds the parameters left unclipped."""
        super().bind(context)
        if "final" in self.exclude and context.layers:
            self._excluded = {id(p) for p in context.layers[-1].params}

    def apply(self, obs: StepObservation) -> None:
        """Clips every unit's gradient relative to its weight, then re-measures the norms."""
        params, grads = obs.grads()
        chosen: list[tuple[nn.Parameter, torch.Tensor]] = [
            (param, grad)
            for param, grad in zip(params, grads, strict=True)
            if id(param) not in self._excluded
            and not ("vectors" in self.exclude and grad.dim() <= 1)
            and not grad.is_sparse
        ]
        if not chosen:
            return
        coefs = []
        with torch.no_grad():
            for param, grad in chosen:
                max_norm = _unit_norms(local_part(param.detach())).clamp(min=self.eps)
                max_norm = max_norm * self.clipping
                grad_norm = _unit_norms(grad)
                coef = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), 1.0)
                coefs.append(coef.to(grad.dtype))
            torch._foreach_mul_([grad for _, grad in chosen], coefs)
        before = _total_now(obs)
        obs.refresh_norms()
        after = _total_now(obs)
        ratio = torch.where(before > 0, after / before, 1.0)
        obs.clip_coef = ratio if obs.clip_coef is None else obs.clip_coef * ratio


class LRBackoff(Remedy):
    """Scales every param group's learning rate down on SPIKE/EXPLODING, and back up once healthy.

    Backoff: a step flagged by a detection named in ``on`` multiplies the scale by ``factor``, for
    the update of that very step. Repeated flags compound (down to ``min_scale``), at most once per
    ``cooldown`` steps: a divergence is flagged on several consecutive steps, and the previous
    backoff needs a few updates to show its effect.

    Recovery: after ``patience`` healthy (unflagged) steps in a row the scale climbs back
    geometrically, one ``factor`` level every ``recovery_steps * depth**2`` steps, where ``depth``
    is the deepest level (number of backoffs) reached since the scale was last 1. With the defaults
    a single spike (depth 1) is fully recovered after ``patience + recovery_steps`` = 50 healthy
    steps; after 2 levels each level takes 160 steps, after 4 levels 640: the deeper the backoff,
    the slower the climb, so a run that diverged at its original rate is not driven straight back
    there. A flag during the climb backs off again and restarts the patience.

    The scale is applied around the optimizer step (a step pre-hook multiplies each group's ``lr``,
    a post-hook puts back the exact original value), so the stored learning rate is never changed:
    any ``torch.optim.lr_scheduler`` (chainable ones included) composes, and once recovered the
    learning rate is exactly the scheduler's. The pre-hook is installed after the first optimizer
    step that follows :meth:`bind` (``bind`` may run inside the optimizer's pre-hook loop, with
    ``attach()``); until then, and when the watch runs inside ``optimizer.step`` (Lightning's
    closure), :meth:`apply` puts the scale in place itself.

    Host synchronisation: reads this step's detection flags with one small transfer per step
    (``obs.host_flags()``, shared with :class:`SkipStep`).

    Example:
        >>> backoff = LRBackoff(factor=0.5, min_scale=1e-3)

    Args:
        factor: Multiplier applied on a flagged step, in (0, 1).
        min_scale: Floor of the scale, in (0, 1].
        patience: Healthy steps in a row before the climb back starts; >= 0.
        recovery_steps: Steps to climb back one ``factor`` level from depth 1; >= 1.
        cooldown: Minimum steps between two backoffs; >= 1 (1 compounds on every flagged step).
        on: Detections that trigger a backoff, among ``"spike"``, ``"exploding"``, ``"nonfinite"``.

    Raises:
        ValueError: An argument outside its range or an unknown ``on`` name.
    """

    needs_optimizer: ClassVar[bool] = True
    scales_lr: ClassVar[bool] = True

    def __init__(
        self,
        factor: float = 0.5,
        *,
        min_scale: float = 1e-3,
        patience: int = 10,
        recovery_steps: int = 40,
        cooldown: int = 5,
        on: Sequence[str] = ("spike", "exploding"),
    ) -> None:
        self.factor = check_number("factor", factor, low=0.0, high=1.0, high_open=True)
        self.min_scale = check_number("min_scale", min_scale, low=0.0, high=1.0)
        check_int("patience", patience, minimum=0)
        check_int("recovery_steps", recovery_steps, minimum=1)
        check_int("cooldown", cooldown, minimum=1)
        self.patience = patience
        self.cooldown = cooldown
        self.recovery_steps = recovery_steps
        self.on = check_names("on", on, tuple(_TRIGGERS))
        self._kinds = [_TRIGGERS[name] for name in self.on]
        self._max_level = math.log(self.min_scale) / math.log(self.factor)
        self.level = 0.0  # the scale is factor ** level
        self.depth = 0.0  # deepest level since the scale was last 1
        self.healthy_steps = 0
        self.since_backoff = cooldown
        self.backoffs = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._pre_handle: RemovableHandle | None = None
        self._post_handle: RemovableHandle | None = None
        self._saved_lrs: list[Any] | None = None

    @property
    def scale(self) -> float:
        """Current learning-rate scale (exactly 1.0 when not backed off)."""
        return 1.0 if self.level == 0.0 else max(self.factor**self.level, self.min_scale)

    def bind(self, context: WatchContext) -> None:
        """Installs the post-hook; the pre-hook follows after the first optimizer step.

        ``bind`` may run inside the optimizer's own pre-hook loop (``GradWatch.attach()``), where
        adding a pre-hook would break that loop; the post-hook dictionary is not iterated then.
        """
        super().bind(context)
        if context.optimizer is None:
            raise ValueError(
                "LRBackoff needs the optimizer: GradWatch(model, optimizer, remedies=...)"
            )
        self.detach()
        self._optimizer = context.optimizer
        self._post_handle = context.optimizer.register_step_post_hook(self._after_optimizer_step)

    def apply(self, obs: StepObservation) -> None:
        """Backs off on a flagged step, otherwise counts a healthy step and climbs back."""
        flags = obs.host_flags()
        if any(flags.get(kind, False) for kind in self._kinds):
            if self.since_backoff >= self.cooldown:
                self.level = min(self.level + 1.0, self._max_level)
                self.depth = max(self.depth, self.level)
                self.backoffs += 1
                self.since_backoff = 0
            self.healthy_steps = 0
        else:
            self.healthy_steps += 1
            if self.healthy_steps > self.patience and self.level > 0.0:
                self.level -= 1.0 / (self.recovery_steps * self.depth**2)
                if self.level < 1e-9:
                    self.level, self.depth = 0.0, 0.0
        self.since_backoff += 1
        obs.lr_scale = self.scale
        # Inside optimizer.step (the pre-hook already ran, e.g. Lightning calls the watch from the
        # closure) or before the pre-hook exists: put this step's scale in place now.
        if self._saved_lrs is not None or self._pre_handle is None:
            self._scale_lrs()

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._scale_lrs()

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._restore_lrs()
        if self._pre_handle is None and self._optimizer is not None:
            self._pre_handle = self._optimizer.register_step_pre_hook(self._before_optimizer_step)

    def _scale_lrs(self) -> None:
        """Remembers every group's learning rate and multiplies it by the scale."""
        if self._optimizer is None:
            return
        self._restore_lrs()
        groups = self._optimizer.param_groups
        self._saved_lrs = [group["lr"] for group in groups]
        scale = self.scale
        if scale != 1.0:
            for group, lr in zip(groups, self._saved_lrs, strict=False):
                group["lr"] = lr * scale

    def _restore_lrs(self) -> None:
        """Puts back the exact learning-rate objects remembered by :meth:`_scale_lrs`."""
        if self._saved_lrs is None or self._optimizer is None:
            return
        for group, lr in zip(self._optimizer.param_groups, self._saved_lrs, strict=False):
            group["lr"] = lr
        self._saved_lrs = None

    def detach(self) -> None:
        """Restores the learning rates if scaled and removes both optimizer hooks."""
        self._restore_lrs()
        for handle in (self._pre_handle, self._post_handle):
            if handle is not None:
                handle.remove()
        self._pre_handle = self._post_handle = None

    def state_dict(self) -> dict[str, Any]:
        """Backoff level and depth, step counters and the number of backoffs."""
        return {
            "level": self.level,
            "depth": self.depth,
            "healthy_steps": self.healthy_steps,
            "since_backoff": self.since_backoff,
            "backoffs": self.backoffs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.level = float(state.get("level", 0.0))
        self.depth = float(state.get("depth", 0.0))
        self.healthy_steps = int(state.get("healthy_steps", 0))
        self.since_backoff = int(state.get("since_backoff", self.cooldown))
        self.backoffs = int(state.get("backoffs", 0))


class SkipStep(Remedy):
    """Drops the update of a step flagged by any detection named in ``on``.

    Sets ``obs.skip``; the watch then removes every gradient of the optimizer's parameters, so
    ``optimizer.step()`` leaves parameters and optimizer state (moments, step counts) untouched. In
    a plain loop ``report.skipped`` tells the caller; with ``attach()`` and in Lightning the skip is
    enforced. Needs the optimizer (to know which parameters it updates).

    Host synchronisation: reads this step's detection flags with one small transfer per step
    (``obs.host_flags()``, shared with :class:`LRBackoff`).

    Example:
        >>> skip = SkipStep(on=("nonfinite", "spike"))

    Args:
        on: Detections that skip the step, among ``"nonfinite"``, ``"spike"``, ``"exploding"``.
            ``"nonfinite"`` needs no detector (the watch checks gradients and loss itself).

    Raises:
        ValueError: An empty or unknown ``on`` name.
    """

    needs_optimizer: ClassVar[bool] = True

    def __init__(self, on: Sequence[str] = ("nonfinite",)) -> None:
        self.on = check_names("on", on, tuple(_TRIGGERS))
        self._kinds = [_TRIGGERS[name] for name in self.on]
        self.skipped = 0

    def apply(self, obs: StepObservation) -> None:
        """Marks the step as skipped when one of the chosen detections fired."""
        flags = obs.host_flags()
        if any(flags.get(kind, False) for kind in self._kinds):
            obs.skip = True
            self.skipped += 1

    def state_dict(self) -> dict[str, Any]:
        """Number of steps skipped so far."""
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the number of steps skipped."""
        self.skipped = int(state.get("skipped", 0))


def _total_now(obs: StepObservation) -> torch.Tensor:
    """The total gradient norm after earlier remedies (float32 0-d device tensor)."""
    total = obs.total_now if obs.total_now is not None else obs.total_norm
    return total.float()


def _unit_norms(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output unit (dims 1.. reduced, kept), or of the whole vector/scalar."""
    if tensor.dim() <= 1:
        return torch.linalg.vector_norm(tensor, dtype=torch.float32)
    dims = tuple(range(1, tensor.dim()))
    return torch.linalg.vector_norm(tensor, dim=dims, keepdim=True, dtype=torch.float32)
