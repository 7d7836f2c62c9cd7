"""Remedies: decide how to change the gradients or the update of a step, in the order given.

A remedy reads a :class:`~gradwatch.engine.observation.RemedyInput` (the step, this step's
detection flags, and the total norm after the remedies before it) and returns a
:class:`~gradwatch.engine.observation.Decision`; the engine applies the decisions. Every decision
is made on the device, from device tensors: no remedy reads a value on the host. Where the engine
applies them (``Engine`` and :mod:`gradwatch.engine.optimizer`):

* with a fused ``Adam``/``AdamW``/``SGD`` (``fused=True``), the clipping of :class:`ClipNorm`,
  :class:`AutoClip`, :class:`ZClip` and the global part of :class:`AGC` is one divisor and
  :class:`SkipStep` one flag that the optimizer's kernel reads (``grad_scale``, ``found_inf``): no
  extra pass over the gradients, no host read. :class:`AGC`'s unit-wise factors are one value per
  output unit, which no single scalar carries: they keep their pass;
* with any other optimizer, the clipping is one pass over the gradients (like
  ``clip_grad_norm_``) and a skipped step is enforced by dropping the gradients after one host read
  of the flag, inside ``optimizer.step()``;
* :class:`LRBackoff` scales the learning rate in place on the device when every group's ``lr`` is
  a tensor (fused/capturable optimizers accept one), else after one host read of the scale per
  step.

Example:
    >>> import torch, gradwatch as gw
    >>> model = torch.nn.Linear(4, 1)
    >>> optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    >>> watch = gw.GradWatch(model, optimizer, remedies=[gw.ZClip(), gw.SkipStep()])
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import ClassVar

import torch

from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.checks import check_int, check_names, check_number
from gradwatch.engine.component import Component
from gradwatch.engine.distributed import local_part
from gradwatch.engine.observation import Decision, RemedyInput
from gradwatch.engine.probe import accumulation_dtype
from gradwatch.engine.thresholds import AUTOCLIP_MAX_HISTORY, CLIP_EPS

_AGC_EXCLUSIONS = ("final", "vectors")
TRIGGERS = {
    "nonfinite": AlertKind.NONFINITE,
    "spike": AlertKind.SPIKE,
    "exploding": AlertKind.EXPLODING,
}
"""The detections a remedy can be triggered by (``on=``), by name."""


class Remedy(Component):
    """Base class of every remedy.

    Subclasses declare their state with :meth:`add_state`, derive layout-dependent constants in
    :meth:`prepare` and implement :meth:`decide`.

    Attributes:
        clips: Its decisions scale the gradients (``clip_coef`` is reported).
        scales_lr: Its decisions scale the learning rate (``lr_scale`` is reported).
        skips: Its decisions may skip the update.
        needs_optimizer: It acts on the optimizer (``GradWatch`` requires one).
        needs_output_layer: It reads :attr:`RemedyInput.output_params` (the engine then finds the
            output layer from the first forward's autograd graph).
    """

    clips: ClassVar[bool] = False
    scales_lr: ClassVar[bool] = False
    skips: ClassVar[bool] = False
    needs_optimizer: ClassVar[bool] = False
    needs_output_layer: bool = False

    def decide(self, view: RemedyInput) -> Decision:
        """This remedy's decision for one step."""
        raise NotImplementedError


class ClipNorm(Remedy):
    """Fixed total-norm clipping, numerically ``torch.nn.utils.clip_grad_norm_``.

    The total norm is formed as ``clip_grad_norm_`` forms it, from per-tensor norms in the
    gradients' own precision in ``model.parameters()`` order (bit for bit its total for float32 and
    float64 models), reusing the L2 norms the probe already measured: no second pass for
    ``norm_type=2`` (``inf`` costs one read of the gradients). The coefficient ``clamp(max_norm /
    (total + 1e-6), max=1)`` is computed on the device and applied unconditionally: no host
    synchronisation. Float64 gradients are multiplied by it (bit for bit ``clip_grad_norm_``);
    lower precisions are divided by ``1 / coef``, as the fused optimizers' kernels do (within one
    ulp of ``clip_grad_norm_``'s product).

    Example:
        >>> clip = ClipNorm(max_norm=1.0)

    Args:
        max_norm: Largest total gradient norm allowed; > 0.
        norm_type: ``2.0`` or ``inf``, as in ``clip_grad_norm_``.

    Raises:
        ValueError: ``max_norm`` not positive and finite, or another ``norm_type``.
    """

    clips = True

    def __init__(self, max_norm: float, norm_type: float | str = 2.0) -> None:
        super().__init__()
        self.max_norm = check_number("max_norm", max_norm, low=0.0)
        try:
            norm = float(norm_type)
        except (TypeError, ValueError):
            norm = math.nan
        if norm not in (2.0, math.inf) or isinstance(norm_type, bool):
            raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
        self.norm_type = norm

    def decide(self, view: RemedyInput) -> Decision:
        """Scales the gradients so that their total norm is at most ``max_norm``."""
        total = view.total_norm(self.norm_type)
        coef = (self.max_norm / (total + CLIP_EPS)).clamp(max=1.0)
        return Decision(clip_coef=coef)


class AutoClip(Remedy):
    """Clips the total norm to a percentile of the norms seen so far (Seetharaman et al., 2020).

    Each step appends the observed total norm (after earlier remedies) to the history, then clips
    to the ``percentile``-th percentile of the history (linear interpolation, as
    ``numpy.percentile``). Non-finite steps (and AMP overflow steps) never enter the history and are
    not clipped.

    The history lives on the device: the last ``window`` steps, or with ``window=None`` the whole
    run up to the most recent :data:`~gradwatch.engine.thresholds.AUTOCLIP_MAX_HISTORY` steps. The
    percentile is found with one partial sort (``torch.topk`` of the smallest ``percentile``% of
    the history) per step; no host synchronisation.

    Example:
        >>> clip = AutoClip(percentile=10.0, window=1000)

    Args:
        percentile: Percentile of the history to clip to, in (0, 100].
        window: Steps of history kept (>= 1), or None for the whole run (capped as above).

    Raises:
        ValueError: ``percentile`` outside (0, 100] or ``window`` < 1.
    """

    clips = True
    norms: torch.Tensor
    written: int

    def __init__(self, percentile: float = 10.0, window: int | None = None) -> None:
        super().__init__()
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0)
        if window is not None:
            check_int("window", window, minimum=1, maximum=AUTOCLIP_MAX_HISTORY * 100)
        self.window = window
        self.capacity = window if window is not None else AUTOCLIP_MAX_HISTORY
        # A ring of the last ``capacity`` norms; +inf marks an empty slot or a step left out
        # (it sorts after every real norm).
        self.add_state("norms", math.inf, self.capacity)
        self.add_state("written", 0)

    def decide(self, view: RemedyInput) -> Decision:
        """Records this step's total norm and clips to the percentile of the history."""
        total = view.total_now.float()
        valid = view.obs.valid[0] & torch.isfinite(total)
        self.norms[self.written % self.capacity].copy_(torch.where(valid, total, math.inf))
        self.written += 1
        coef = (self._threshold() / (total + CLIP_EPS)).clamp(max=1.0)
        return Decision(clip_coef=torch.where(valid, coef, 1.0))

    def _threshold(self) -> torch.Tensor:
        """The percentile of the recorded finite norms, +inf while there is none (on device)."""
        size = min(self.written, self.capacity)
        history = self.norms[:size]
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

    ``max_grad_norm`` adds a fixed cap on every valid step, warm-up included (the statistics still
    see the uncapped norm), as the reference implementation (the ``zclip`` package) does. Its
    default there is ``max_grad_norm=1.0``, which makes it "clip every step to 1.0, plus z-score
    spike clipping"; here the default is None, z-score spike clipping only. Pass
    ``max_grad_norm=1.0`` to reproduce the package's defaults.

    Example:
        >>> clip = ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25)

    Args:
        alpha: EMA smoothing factor, in (0, 1).
        z_thresh: z-score above which a step is clipped; > 0.
        warmup_steps: Valid steps used to initialise mean and variance; >= 1.
        eps: Added to the standard deviation in the z-score; > 0.
        max_grad_norm: Largest total norm allowed on any step (> 0), or None for no cap.

    Raises:
        ValueError: An argument outside its range.
    """

    clips = True
    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        eps: float = 1e-6,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, high_open=True)
        self.z_thresh = check_number("z_thresh", z_thresh, low=0.0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.eps = check_number("eps", eps, low=0.0)
        self.max_grad_norm = (
            check_number("max_grad_norm", max_grad_norm, low=0.0)
            if max_grad_norm is not None
            else None
        )
        self.add_state("mean", 0.0, "scalar")
        self.add_state("var", 0.0, "scalar")
        self.add_state("count", 0.0, "scalar")  # valid warm-up steps seen

    def decide(self, view: RemedyInput) -> Decision:
        """Clips an outlier step back toward the running mean and updates the statistics."""
        norm = view.total_now.float()
        valid = view.obs.valid[0]  # finite gradients and loss: the total norm is finite too
        mean, var, count = self.mean, self.var, self.count
        warming = count < self.warmup_steps
        std = var.sqrt()
        delta = norm - mean
        z = delta / (std + self.eps)
        spike = valid & ~warming & (z > self.z_thresh)
        threshold = torch.addcdiv(mean, std, z, value=self.z_thresh**2)
        coef = torch.where(spike, threshold / (norm + CLIP_EPS), 1.0)
        if self.max_grad_norm is not None:
            cap = (self.max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
            coef = torch.where(valid, torch.minimum(coef, cap), coef)

        clipped = torch.where(spike, threshold, norm)
        seen = count + 1  # warm-up: running population mean and variance (Welford)
        warm_mean = torch.addcdiv(mean, delta, seen)
        warm_var = torch.addcmul(var * count, delta, norm - warm_mean) / seen
        ema_mean = mean.lerp(clipped, 1.0 - self.alpha)
        ema_var = var.lerp((clipped - ema_mean).square(), 1.0 - self.alpha)
        self.mean = torch.where(valid, torch.where(warming, warm_mean, ema_mean), mean)
        self.var = torch.where(valid, torch.where(warming, warm_var, ema_var), var)
        self.count = torch.where(valid & warming, seen, count)
        return Decision(clip_coef=coef)


class AGC(Remedy):
    """Unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets).

    For every parameter, each output unit (a slice along dim 0: a row of a Linear weight, a filter
    of a Conv weight) has its gradient norm limited to ``clipping * max(||w_unit||, eps)``:
    ``g_unit <- g_unit * max_norm / max(||g_unit||, 1e-6)`` when ``||g_unit|| > max_norm``, as the
    reference implementation. Vectors and scalars (biases, normalisation gains) count as one unit,
    as in the reference. With ``exclude=()`` this is timm's ``adaptive_clip_grad`` (which clips at
    ``>=``, this at ``>``).

    The paper leaves the output (classifier) layer unclipped; so does the default
    ``exclude=("final",)``. The output layer is found from the autograd graph of the first
    training forward's output (:mod:`gradwatch.engine.output_layer`): the layer(s) owning the
    weight of the operation that produces the output, so a ViT's classifier head is excluded (not
    its ``cls_token``/``pos_embed``, which the root module owns), and a head tied to the embedding
    excludes the embedding (the tied matrix). Add ``"vectors"`` to leave every 1-d parameter alone
    too.

    Cost: the factors are one value per unit, which no single scalar carries, so AGC reads the
    weights and the gradients and multiplies the clipped gradients in place (per parameter, on the
    device: no host synchronisation), also with a fused optimizer. The clipping of the remedies
    before it is taken into account without being applied first, and the total norm the remedies
    after it see is computed from the unit norms (no further pass). The coefficient reported as
    ``clip_coef`` is the ratio of total norms after/before AGC. With sharded parameters each rank
    clips the units it holds (exact for dim-0 sharding, as FSDP2 uses).

    Example:
        >>> agc = AGC(clipping=0.01, exclude=("final", "vectors"))

    Args:
        clipping: The clipping factor λ; > 0.
        eps: Floor of the weight unit norm (so zero-initialised weights can still move); > 0.
        exclude: Parameters left unclipped: ``"final"`` (the output layer) and/or ``"vectors"``
            (every parameter with at most one dimension).

    Raises:
        ValueError: ``clipping``/``eps`` not positive, or an unknown ``exclude`` name.
    """

    clips = True

    def __init__(
        self, clipping: float = 0.01, eps: float = 1e-3, exclude: Collection[str] = ("final",)
    ) -> None:
        super().__init__()
        self.clipping = check_number("clipping", clipping, low=0.0)
        self.eps = check_number("eps", eps, low=0.0)
        self.exclude = check_names("exclude", exclude, _AGC_EXCLUSIONS, allow_empty=True)
        self.needs_output_layer = "final" in self.exclude

    def decide(self, view: RemedyInput) -> Decision:
        """Clips every unit's gradient relative to its weight."""
        params, grads = view.grads()
        excluded = view.output_params if self.needs_output_layer else frozenset()
        factor = view.grad_factor
        coefs, positions, sq_after = [], [], []
        with torch.no_grad():
            for position, (param, grad) in enumerate(zip(params, grads, strict=True)):
                if (
                    id(param) in excluded
                    or ("vectors" in self.exclude and grad.dim() <= 1)
                    or grad.is_sparse
                ):
                    continue
                max_norm = _unit_norms(local_part(param.detach())).clamp(min=self.eps)
                max_norm = max_norm * self.clipping
                stored = _unit_norms(grad)
                grad_norm = stored if factor is None else stored * factor.abs()
                coef = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), 1.0)
                coefs.append((grad, coef.to(grad.dtype)))
                positions.append(position)
                sq_after.append((stored * coef).square().sum())
            tensor_sq = None
            if positions:
                tensor_sq = view.tensor_sq_norms().clone()
                index = torch.tensor(positions, device=tensor_sq.device)
                tensor_sq[index] = torch.stack(sq_after).to(tensor_sq.device, tensor_sq.dtype)
        return Decision(tensor_coefs=coefs, tensor_sq_norms=tensor_sq)


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

    The state machine runs on the device (every branch a ``torch.where`` on float64 scalars), and
    the engine applies the scale around the optimizer step (a step pre-hook multiplies each group's
    ``lr``, a post-hook puts back the exact original value), so the stored learning rate is never
    changed: any ``torch.optim.lr_scheduler`` (chainable ones included) composes, and once recovered
    the learning rate is exactly the scheduler's.

    Host synchronisation: none when every group's ``lr`` is a tensor (fused or capturable
    ``Adam``/``AdamW``/``SGD`` accept ``lr=torch.tensor(...)``; it is scaled in place on the
    device). With a float ``lr``, the scale is read on the host once per step, inside
    ``optimizer.step()``.

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

    scales_lr = True
    needs_optimizer = True
    level: torch.Tensor
    depth: torch.Tensor
    healthy_steps: torch.Tensor
    since_backoff: torch.Tensor
    backoffs: torch.Tensor

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
        super().__init__()
        self.factor = check_number("factor", factor, low=0.0, high=1.0, high_open=True)
        self.min_scale = check_number("min_scale", min_scale, low=0.0, high=1.0)
        self.patience = check_int("patience", patience, minimum=0)
        self.recovery_steps = check_int("recovery_steps", recovery_steps, minimum=1)
        self.cooldown = check_int("cooldown", cooldown, minimum=1)
        self.on = check_names("on", on, tuple(TRIGGERS))
        self._kinds = [TRIGGERS[name] for name in self.on]
        self._max_level = math.log(self.min_scale) / math.log(self.factor)
        double = torch.float64  # the scale is factor ** level, exactly as in Python floats
        self.add_state("level", 0.0, "scalar", double)
        self.add_state("depth", 0.0, "scalar", double)  # deepest level since the scale was 1
        self.add_state("healthy_steps", 0, "scalar", double)
        self.add_state("since_backoff", cooldown, "scalar", double)
        self.add_state("backoffs", 0, "scalar", double)

    @property
    def scale(self) -> float:
        """Current learning-rate scale (exactly 1.0 when not backed off); reads the device."""
        return float(self._scale())

    def decide(self, view: RemedyInput) -> Decision:
        """Backs off on a flagged step, otherwise counts a healthy step and climbs back."""
        flagged = view.flagged(self._kinds)
        level, depth = self.level, self.depth
        backs_off = flagged & (self.since_backoff >= self.cooldown)
        raised = (level + 1.0).clamp(max=self._max_level)
        healthy = torch.where(flagged, 0.0, self.healthy_steps + 1.0)
        climbing = ~flagged & (healthy > self.patience) & (level > 0.0)
        safe_depth = torch.where(depth > 0.0, depth, 1.0)  # depth > 0 whenever level > 0
        climbed = level - 1.0 / (self.recovery_steps * safe_depth.square())
        recovered = climbing & (climbed < 1e-9)
        self.level = torch.where(
            backs_off, raised, torch.where(recovered, 0.0, torch.where(climbing, climbed, level))
        )
        self.depth = torch.where(
            backs_off, torch.maximum(depth, raised), torch.where(recovered, 0.0, depth)
        )
        self.healthy_steps = healthy
        self.since_backoff = torch.where(backs_off, 1.0, self.since_backoff + 1.0)
        self.backoffs = self.backoffs + backs_off.double()
        return Decision(lr_scale=self._scale())

    def _scale(self) -> torch.Tensor:
        power = torch.pow(self.factor, self.level).clamp(min=self.min_scale)
        return torch.where(self.level == 0.0, 1.0, power)


class SkipStep(Remedy):
    """Skips the update of a step flagged by any detection named in ``on``.

    The decision stays on the device. With a fused ``Adam``/``AdamW``/``SGD`` the optimizer's kernel
    skips the update itself (``found_inf``): no host synchronisation; parameters and optimizer
    state (moments, step counts, weight decay) are untouched. With any other optimizer the flag is
    read on the host inside ``optimizer.step()`` (one read per step) and the gradients are dropped
    there, so the update does nothing. Either way ``optimizer.step()`` may be called on every step
    (``attach()`` and Lightning do); ``report.skipped`` tells a plain loop (reading it costs one
    host read).

    The running statistics of normalisation layers (BatchNorm...) are restored on a skipped step: a
    NaN batch poisons them in the forward pass already (see
    :mod:`gradwatch.engine.running_stats`).

    Example:
        >>> skip = SkipStep(on=("nonfinite", "spike"))

    Args:
        on: Detections that skip the step, among ``"nonfinite"``, ``"spike"``, ``"exploding"``.
            ``"nonfinite"`` needs no detector (the engine checks gradients and loss itself).

    Raises:
        ValueError: An empty or unknown ``on`` name.
    """

    skips = True
    needs_optimizer = True
    skipped: torch.Tensor

    def __init__(self, on: Sequence[str] = ("nonfinite",)) -> None:
        super().__init__()
        self.on = check_names("on", on, tuple(TRIGGERS))
        self._kinds = [TRIGGERS[name] for name in self.on]
        self.add_state("skipped", 0, "scalar")

    def decide(self, view: RemedyInput) -> Decision:
        """Skips the step when one of the chosen detections fired."""
        skip = view.flagged(self._kinds)
        self.skipped = self.skipped + skip
        return Decision(skip=skip)


def _unit_norms(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output unit (dims 1.. reduced, kept), or of the whole vector/scalar."""
    dtype = accumulation_dtype(tensor.dtype)  # float64 and complex keep their own precision
    if tensor.dim() <= 1:
        return torch.linalg.vector_norm(tensor, dtype=dtype)
    dims = tuple(range(1, tensor.dim()))
    return torch.linalg.vector_norm(tensor, dim=dims, keepdim=True, dtype=dtype)
