"""Detectors: vectorised, on-device recognisers of gradient pathologies.

A detector reads an :class:`~gradwatch.engine.observation.Observation` and answers with a
:class:`~gradwatch.engine.observation.Detection` made of device tensors; the engine keeps the
detections until the next flush, where they become :class:`~gradwatch.engine.alerts.Alert` objects
on the host. One protocol, two cadences: a ``"step"`` detector sees every step as it happens (so
remedies can act on it at once), a ``"flush"`` detector sees the steps since the previous flush in
one block (slow conditions that no remedy acts on, at no per-step cost).

A detector runs a handful of tiny tensor operations over the ``[L]`` per-layer vectors and never
synchronises with the host: its running statistics are declared state (device tensors) and every
decision is a ``torch.where``. Default thresholds live in :mod:`gradwatch.engine.thresholds`.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.checks import check_fraction, check_int, check_number
from gradwatch.engine.component import Component
from gradwatch.engine.layers import Layout
from gradwatch.engine.observation import Detection, Observation, finite
from gradwatch.engine.origin import Origin
from gradwatch.engine.roles import Role, role_of
from gradwatch.engine.text import format_layers
from gradwatch.engine.thresholds import (
    DEAD_FRACTION,
    DEAD_TOTAL_WINDOW,
    DEAD_WINDOW,
    EXPLODING_ADAPTIVE_UPDATE,
    EXPLODING_PROFILE_ONCE,
    EXPLODING_PROFILE_PATIENCE,
    EXPLODING_PROFILE_RATIO,
    EXPLODING_SGD_UPDATE,
    EXPLODING_WEIGHT_FLOOR,
    NORM_GROWTH,
    NORM_GROWTH_WINDOW,
    SATURATION_FRACTION,
    SATURATION_PATIENCE,
    SPIKE_BETA,
    SPIKE_LAYER_MIN_RATIO,
    SPIKE_MIN_RATIO,
    SPIKE_WARMUP,
    SPIKE_Z,
    STAGNATION_PATIENCE,
    STAGNATION_RATIO,
    VANISHING_PATIENCE,
    VANISHING_RATIO,
    ZERO_GRAD_PATIENCE,
)

Cadence = Literal["step", "flush"]


class Detector(Component):
    """Base class of every detector.

    Subclasses set ``kind``, declare their state with :meth:`add_state`, derive layout-dependent
    constants in :meth:`prepare`, and implement :meth:`observe` and :meth:`message`.

    Attributes:
        kind: The alert kind this detector raises.
        cadence: ``"step"`` (sees each step, ``k == 1``) or ``"flush"`` (sees the steps since the
            previous flush at once).
        needs: The ``GradWatch`` option whose measurements it reads (``"check_activations"``,
            ``"track_updates"``), if any; without it the detector stays quiet.
        severity: Severity of its alerts.
        threshold: The threshold reported with its alerts.
    """

    kind: ClassVar[AlertKind]
    cadence: ClassVar[Cadence] = "step"
    needs: ClassVar[str | None] = None
    severity: ClassVar[str] = "warning"

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = threshold

    def candidate_names(self) -> list[str]:
        """Names that :attr:`Detection.scores` index (the layers by default)."""
        return self.layout.names

    def observe(self, obs: Observation) -> Detection:
        """Updates the statistics with a block of steps and says where the condition holds."""
        raise NotImplementedError

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        """One sentence describing a detection with this value in these layers."""
        raise NotImplementedError


class _Profile(Detector):
    """Shared by the vanishing and exploding profiles: the first quarter of the layers against the
    last quarter (forward order), geometric means of the scale-free gradient RMS
    (``norm / sqrt(numel)``). Exactly-zero gradients carry no information and are left out; so
    are embeddings, whose gradients are row-sparse by construction. Needs at least two comparable
    layers. A slow condition that no remedy acts on: runs at the flush over the pending steps.
    """

    cadence = "flush"
    run: torch.Tensor
    _sign: ClassVar[float] = 1.0  # first quarter: its largest (1) or smallest (-1) gradient

    def __init__(self, ratio: float, patience: int) -> None:
        super().__init__(ratio)
        self.patience = check_int("patience", patience, minimum=1)
        self._log_ratio = math.log10(ratio)
        self._quarter = 1
        self._group_index = torch.zeros(0, dtype=torch.long)
        self._offset = torch.zeros(0)
        self.add_state("run", 0.0, "scalar")

    def prepare(self) -> None:
        layout = self.layout
        eligible = [
            i
            for i, layer in enumerate(layout.layers)
            if role_of(layer.module) is not Role.EMBEDDING
        ]
        self._quarter = max(1, len(eligible) // 4)
        groups = eligible[: self._quarter] + eligible[-self._quarter :] if len(eligible) > 1 else []
        self._group_index = torch.tensor(groups, dtype=torch.long, device=layout.device)
        # log10(norm) + offset = log10(RMS) for eligible layers, NaN for the others.
        offset = -0.5 * torch.log10(layout.numels.clamp_min(1.0))
        left_out = torch.ones(layout.num_layers, dtype=torch.bool, device=layout.device)
        left_out[eligible] = False
        self._offset = torch.where(left_out, torch.nan, offset)

    def _profile(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[k]`` log10 first/last-quarter ratio (NaN without information), ``[k, L]`` log10
        RMS, ``[k, 1]`` log10 RMS of the last quarter.

        The last quarter is summarised by its geometric mean, the first by its layer closest to
        the last quarter's scale (the largest gradient for vanishing, the smallest for
        exploding): the condition must hold for the whole first quarter, so that one or two
        layers with small gradients by design (attention query/key projections at
        initialisation) do not make a healthy network look vanishing.
        """
        k = obs.norms.shape[0]
        log_rms = torch.log10(obs.norms) + self._offset
        log_rms = torch.where(torch.isfinite(log_rms), log_rms, torch.nan)  # zeros carry no info
        groups = log_rms.index_select(1, self._group_index).view(k, 2, self._quarter)
        late = groups[:, 1].nanmean(1, keepdim=True)
        sign = self._sign
        early = sign * torch.nan_to_num(sign * groups[:, 0], nan=-torch.inf).amax(1)
        early = torch.where(torch.isinf(early), torch.nan, early)  # no information
        return early - late[:, 0], log_rms, late

    def _run(self, obs: Observation, holds: torch.Tensor) -> torch.Tensor:
        """Run length of valid steps where ``holds``, carried over flushes; invalid steps change
        nothing."""
        counted = torch.cumsum((obs.valid & holds).float(), 0)
        resets = torch.where(obs.valid & ~holds, counted, -1.0).cummax(0).values
        run = torch.where(resets >= 0, counted - resets, self.run + counted)
        self.run = run[-1]
        return run


class VanishingDetector(_Profile):
    """Early layers' gradients tiny compared with the last layers', sustained.

    Compares the scale-free per-layer gradient RMS (``norm / sqrt(numel)``): the largest over the
    first quarter of the layers (forward order) against the geometric mean of the last quarter
    (every early layer must be tiny, not only attention query/key projections, whose gradients
    are small at initialisation by design). Layers whose gradient is exactly zero (e.g. behind a
    zero-initialised residual branch at step 0) carry no information and are left out; so are
    embeddings, whose gradients are row-sparse by construction. Needs at least two comparable
    layers. Fires once the ratio stayed below ``ratio`` for ``patience`` consecutive valid steps;
    names the layers below ``ratio`` times the last quarter, tiniest first.

    A slow condition that no remedy acts on: it runs at the flush over the pending steps.

    Example:
        >>> detector = VanishingDetector(ratio=1e-3)

    Args:
        ratio: Early/late gradient RMS ratio below which gradients vanish.
        patience: Consecutive valid steps the condition must hold.
    """

    kind = AlertKind.VANISHING

    def __init__(self, ratio: float = VANISHING_RATIO, patience: int = VANISHING_PATIENCE) -> None:
        super().__init__(check_fraction("ratio", ratio), patience)

    def observe(self, obs: Observation) -> Detection:
        k, num_layers = obs.norms.shape
        if not self._group_index.numel():
            return _quiet_block(k, num_layers, obs.norms.device)
        gap, log_rms, late = self._profile(obs)
        run = self._run(obs, gap < self._log_ratio)  # NaN gap: no information, never holds
        # How far (in decades) each layer sits below ``ratio`` times the last layers: tiniest first.
        scores = (late + self._log_ratio - log_rms).nan_to_num(0.0).clamp_min(0.0)
        return Detection(fired=run >= self.patience, value=torch.pow(10.0, gap), scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            "gradients vanish toward the input: the first layers' gradient RMS is "
            f"{value:.1e} times the last layers' (threshold {self.threshold:.0e}) for "
            f"{self.patience} steps in a row; {format_layers(layers)} barely learn"
        )


class ExplodingProfileDetector(_Profile):
    """Gradients that grow toward the input: the mirror image of vanishing.

    The first quarter of the layers' gradient RMS against the last quarter's (as
    :class:`VanishingDetector`, the same layers left out). Fires at once when the ratio exceeds
    ``once``, or when it stayed above ``ratio`` for ``patience`` consecutive valid steps; names the
    layers above ``ratio`` times the last quarter, largest first. Blind to the optimizer, so it
    also watches a model without one (the exploding RNN of the literature fires at step 0).

    Args:
        ratio: First/last-quarter gradient RMS ratio above which gradients explode, sustained.
        patience: Consecutive valid steps ``ratio`` must be exceeded.
        once: The ratio above which a single step fires.
    """

    kind = AlertKind.EXPLODING
    _sign = -1.0

    def __init__(
        self,
        ratio: float = EXPLODING_PROFILE_RATIO,
        patience: int = EXPLODING_PROFILE_PATIENCE,
        once: float = EXPLODING_PROFILE_ONCE,
    ) -> None:
        super().__init__(check_number("ratio", ratio, low=1.0), patience)
        self.once = check_number("once", once, low=1.0)
        self._log_once = math.log10(self.once)

    def observe(self, obs: Observation) -> Detection:
        k, num_layers = obs.norms.shape
        if not self._group_index.numel():
            return _quiet_block(k, num_layers, obs.norms.device)
        gap, log_rms, late = self._profile(obs)
        run = self._run(obs, gap > self._log_ratio)
        fired = (run >= self.patience) | (obs.valid & (gap > self._log_once))
        scores = (log_rms - late - self._log_ratio).nan_to_num(0.0).clamp_min(0.0)
        return Detection(fired=fired, value=torch.pow(10.0, gap), scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            "gradients explode toward the input: the first layers' gradient RMS is "
            f"{value:.3g} times the last layers' (threshold {self.threshold:g} for "
            f"{self.patience} steps, or {self.once:g} once); {format_layers(layers)} get "
            "the largest gradients"
        )


class NormGrowthDetector(Detector):
    """The total gradient norm grows multiplicatively, step after step: a slow explosion.

    Compares every step's total norm with the one ``window`` steps earlier: fires when it grew more
    than ``growth`` times over the window and by at least ``growth ** 0.25`` over each half of it
    (a steady climb, not one jump, which is the spike detector's business). An EMA-based spike
    detector misses such a climb: its mean and deviation follow the trend. Invalid steps (NaN/Inf,
    AMP overflow) compare with nothing. A slow condition: it runs at the flush.

    Not in the default set: a healthy run can climb as steeply while it learns (BERT-tiny on a
    majority-vote task, AdamW 1e-4: 63x over 20 steps at its loss drop, step 165). Add it where
    the gradient norm is expected to stay level: ``[*default_detectors(), NormGrowthDetector()]``.

    Args:
        growth: Factor by which the total norm must grow over ``window`` steps.
        window: Steps over which the growth is measured.
    """

    kind = AlertKind.EXPLODING
    cadence = "flush"
    tail: torch.Tensor

    def __init__(self, growth: float = NORM_GROWTH, window: int = NORM_GROWTH_WINDOW) -> None:
        super().__init__(_check_ratio("growth", growth))
        self.window = check_int("window", window, minimum=2)
        self._log_growth = math.log(self.threshold)
        self.add_state("tail", math.nan, self.window)  # log totals of the last steps

    def observe(self, obs: Observation) -> Detection:
        k = obs.totals.shape[0]
        log_total = torch.where(obs.valid & (obs.totals > 0), obs.totals.log(), torch.nan)
        sequence = torch.cat([self.tail, log_total])
        window, half = self.window, self.window // 2
        whole = sequence[window:] - sequence[:-window]
        late = sequence[window:] - sequence[window - half : window - half + k]
        early = whole - late
        quarter = self._log_growth / 4
        fired = (whole > self._log_growth) & (late > quarter) & (early > quarter)
        self.tail = sequence[-window:]
        return Detection(fired=fired, value=whole.exp().nan_to_num(0.0))

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"the total gradient norm grew {value:.3g} times over {self.window} steps, steadily "
            f"(threshold {self.threshold:g}): gradients are exploding step after step"
        )


class ExplodingDetector(Detector):
    """Updates that overshoot their weights: the relative update the optimizer is about to make.

    Judges what the optimizer does with the gradient, per layer, as ``||Δw|| / ||w||`` of the
    coming update: under the Adam family every element moves by about the learning rate whatever
    the gradient's size, so the relative update is ``lr * sqrt(numel) / ||w||``; under SGD it is
    ``lr * ||g|| / ||w||``. The learning rates are the ones the optimizer will apply at this step
    (re-read at every step, schedules and manual changes included, times the scale an LR remedy
    such as LRBackoff applied at the previous step, so that a backoff settles). A layer's weight
    RMS counts as at least ``weight_floor`` times the model's median (refreshed at step 0 and
    every flush), so zero-initialised layers and their first tiny weights are not divided by ~0.
    Layers the optimizer does not update (frozen by leaving them out, ``lr=0``) are never judged.
    Without an optimizer, or with one whose rule is neither (L-BFGS, LAMB...), it stays quiet.
    Invalid steps (NaN/Inf, AMP overflow) belong to the non-finite detector.

    Args:
        adaptive_ratio: Relative update above which an Adam-family update overshoots.
        sgd_ratio: Relative update above which an SGD update overshoots.
        weight_floor: Fraction of the median weight RMS below which weights count as that floor.
    """

    kind = AlertKind.EXPLODING

    def __init__(
        self,
        adaptive_ratio: float = EXPLODING_ADAPTIVE_UPDATE,
        sgd_ratio: float = EXPLODING_SGD_UPDATE,
        weight_floor: float = EXPLODING_WEIGHT_FLOOR,
    ) -> None:
        super().__init__(check_number("adaptive_ratio", adaptive_ratio, low=0.0))
        self.adaptive_ratio = self.threshold
        self.sgd_ratio = check_number("sgd_ratio", sgd_ratio, low=0.0)
        self.weight_floor = check_fraction("weight_floor", weight_floor)
        self._sqrt_numel = torch.zeros(0)
        self._seen: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._fixed = torch.zeros(0)
        self._per_grad = torch.zeros(0)

    def prepare(self) -> None:
        self._sqrt_numel = self.layout.numels.clamp_min(1.0).sqrt()
        self._seen = (None, None)

    def _refresh(self, obs: Observation, lr: torch.Tensor) -> None:
        """Relative update per unit of gradient norm and per step, for new weights or rates."""
        self._seen = (obs.weight_norms, lr)
        weight_rms = obs.weight_norms / self._sqrt_numel
        median = torch.where(weight_rms > 0, weight_rms, torch.nan).nanmedian()
        reference = torch.fmax(weight_rms, median * self.weight_floor)  # fmax ignores NaN
        inverse = torch.where(reference > 0, reference.reciprocal(), 0.0)
        zero = torch.zeros_like(inverse)
        if obs.update_rule == "adaptive":  # ||Δw|| ~ lr * sqrt(numel): RMS step lr
            self._fixed, self._per_grad = lr * inverse, zero
            self.threshold = self.adaptive_ratio
        else:  # ||Δw|| = lr * ||g||
            self._fixed, self._per_grad = zero, lr * inverse / self._sqrt_numel
            self.threshold = self.sgd_ratio

    def observe(self, obs: Observation) -> Detection:
        lr = obs.lr
        if lr is None or obs.update_rule not in ("adaptive", "sgd"):
            return _quiet_block(1, self.layout.num_layers, self.layout.device)
        if obs.weight_norms is not self._seen[0] or lr is not self._seen[1]:
            self._refresh(obs, lr)
        relative = torch.addcmul(self._fixed, obs.norms[0], self._per_grad)
        over = relative > self.threshold
        fired = obs.valid & over.any()
        return Detection(
            fired=fired, value=relative.amax()[None], scores=torch.where(over, relative, 0.0)[None]
        )

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"updates overshoot the weights: the optimizer's next update of "
            f"{format_layers(layers)} is {value:.3g} times the size of their weights "
            f"(threshold {self.threshold:g}): the learning rate is too high for them"
        )


class SpikeDetector(Detector):
    """A sudden jump of the total or a per-layer gradient norm against its own recent history.

    Keeps an EMA mean and variance of the log-norm of every layer and of the total (Welford-style
    exponential moving statistics, a plain running mean for the first ``warmup`` samples). A norm
    spikes when it is both ``z_threshold`` deviations and ``min_ratio`` (the total) or
    ``layer_min_ratio`` (a layer) times above its mean: single layers are noisier than their sum.
    Only valid steps enter the statistics (no NaN/Inf, no AMP overflow) and exact zeros are
    skipped; a spiking value enters them clamped to the threshold, so one spike does not blind the
    detector. Layers the optimizer does not update are left out (their gradients steer nothing).

    Args:
        z_threshold: Deviations above the EMA mean (of log-norms) that count as a spike.
        min_ratio: The total norm must also be at least this many times its EMA (geometric) mean.
        beta: EMA decay of the mean and variance, in (0, 1).
        warmup: Samples of a norm needed before it can spike.
        layer_min_ratio: A layer's norm must be at least this many times its EMA mean.
    """

    kind = AlertKind.SPIKE
    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        z_threshold: float = SPIKE_Z,
        min_ratio: float = SPIKE_MIN_RATIO,
        beta: float = SPIKE_BETA,
        warmup: int = SPIKE_WARMUP,
        layer_min_ratio: float = SPIKE_LAYER_MIN_RATIO,
    ) -> None:
        super().__init__(check_number("z_threshold", z_threshold, low=0.0))
        self.min_ratio = _check_ratio("min_ratio", min_ratio)
        self.layer_min_ratio = _check_ratio("layer_min_ratio", layer_min_ratio)
        self.beta = check_fraction("beta", beta)
        self.warmup = check_int("warmup", warmup, minimum=1)
        self.add_state("mean", 0.0, "layers+1")  # every layer, then the total
        self.add_state("var", 0.0, "layers+1")
        self.add_state("count", 0.0, "layers+1")
        self._log_min = torch.zeros(0)
        self._cap = torch.zeros(0)
        self._gate = torch.zeros(0)
        self._jump = torch.zeros(0)
        self._weight = torch.zeros(0)
        self._lr: torch.Tensor | None = None
        self._updated = torch.zeros(0, dtype=torch.bool)
        self._layout: Layout | None = None

    def prepare(self) -> None:
        """Derives next step's thresholds from the statistics (done once per update)."""
        num_layers = self.layout.num_layers
        if self._layout is not self.layout:  # bound to (new) layers
            self._layout = self.layout
            log_min = torch.full((num_layers + 1,), math.log(self.layer_min_ratio))
            log_min[-1] = math.log(self.min_ratio)
            self._log_min = log_min.to(self.layout.device)
            self._lr = None
            self._updated = torch.ones(num_layers + 1, dtype=torch.bool, device=self.layout.device)
        warm = self.count >= self.warmup
        self._cap = torch.where(warm, self.threshold * self.var.sqrt(), torch.inf)
        self._gate = torch.maximum(self._cap, self._log_min)  # z deviations and the min ratio
        self._jump = torch.where(warm, self._log_min, torch.inf)[:num_layers]
        self._weight = (self.count + 1).reciprocal().clamp_min(1.0 - self.beta)

    def observe(self, obs: Observation) -> Detection:
        num_layers = self.layout.num_layers
        if obs.lr is not None and obs.lr is not self._lr:  # new rates: which layers move
            self._lr = obs.lr
            self._updated = torch.cat([obs.lr > 0, self._updated[-1:]])
        deviation = torch.cat([obs.norms[0], obs.totals]).log() - self.mean
        present = finite(deviation) & obs.valid & self._updated
        spiking = (deviation > self._gate) & present
        fired = spiking.any()
        # Running mean while warming up, EMA after; a spike enters capped at the threshold.
        delta = torch.where(present, torch.minimum(deviation, self._cap), 0.0)
        weight = self._weight * present
        self.mean = torch.addcmul(self.mean, weight, delta)
        self.var = (1.0 - weight) * torch.addcmul(self.var, weight * delta, delta)
        self.count = self.count + present
        self.prepare()
        value = torch.where(spiking, deviation, -torch.inf).amax().exp()
        layer_deviation = deviation[:num_layers]
        scores = torch.where(fired & (layer_deviation > self._jump), layer_deviation, 0.0)
        return Detection(fired=fired.reshape(1), value=value.reshape(1), scores=scores[None])

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        self.prepare()

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        where = f" (largest jumps in {format_layers(layers)})" if layers else ""
        return (
            f"the gradient norm jumped to {value:.3g} times its recent typical value{where}: "
            "the run may be diverging (learning rate too high, a bad batch)"
        )


class ZeroGradientDetector(Detector):
    """Layers whose gradient is exactly zero (or absent) for many steps in a row.

    An exactly-zero gradient is no small gradient: nothing reaches the layer at all (every ReLU
    after it dead, a branch cut off by ``detach`` or a zero multiplier, a parameter the loss never
    uses). Fires once a layer's gradient stayed exactly zero for ``patience`` consecutive valid
    steps, and keeps firing until it moves. Never reports what is known not to learn: frozen
    parameters are not watched, layers the optimizer does not update (or with ``lr=0``) and
    embeddings (whose rows outside the batch get no gradient by construction) are left out.
    A slow condition that no remedy acts on: it runs at the flush over the pending steps.

    Args:
        patience: Consecutive valid steps of exactly-zero gradient.
    """

    kind = AlertKind.ZERO_GRAD
    cadence = "flush"
    run: torch.Tensor

    def __init__(self, patience: int = ZERO_GRAD_PATIENCE) -> None:
        super().__init__(0.0)
        self.patience = check_int("patience", patience, minimum=1)
        self._eligible = torch.zeros(0, dtype=torch.bool)
        self.add_state("run", 0.0, "layers")

    def prepare(self) -> None:
        eligible = [role_of(layer.module) is not Role.EMBEDDING for layer in self.layout.layers]
        self._eligible = torch.tensor(eligible, dtype=torch.bool, device=self.layout.device)

    def observe(self, obs: Observation) -> Detection:
        zero = obs.norms == 0
        valid = obs.valid[:, None]
        counted = torch.cumsum((valid & zero).float(), 0)
        resets = torch.where(valid & ~zero, counted, -1.0).cummax(0).values
        run = torch.where(resets >= 0, counted - resets, self.run + counted)
        self.run = run[-1]
        eligible = self._eligible if obs.lr is None else self._eligible & (obs.lr > 0)
        firing = (run >= self.patience) & eligible
        scores = torch.where(firing, run, 0.0)
        return Detection(fired=firing.any(1), value=firing.sum(1).float(), scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"{value:g} layer(s) got an exactly-zero gradient for {self.patience}+ steps in a "
            f"row: {format_layers(layers)} do not learn at all (nothing reaches them: dead ReLUs "
            "after them, a detached or zero-multiplied branch, or a parameter the loss never uses)"
        )


class NonFiniteDetector(Detector):
    """NaN/Inf in gradients, in the loss, or in the model's output, and where it came from.

    The origin (the alert's ``value``, an :class:`~gradwatch.engine.origin.Origin`) is decided on
    the device, first match wins:

    - ``input``: a floating-point tensor entering the model was non-finite before any checked
      output was (the data pipeline);
    - ``forward``: a checked output was non-finite, its inputs finite: the model's output by
      default, or with ``check_activations=True`` the first module in forward order (any module)
      whose output was, which the alert names;
    - ``loss``: the model's output finite, the loss passed to ``step()`` not;
    - ``backward``: the loss finite, a gradient not; the alert names the layers with non-finite
      gradients, deepest first (backward meets the NaN there first).

    It fires when a gradient, the loss or a checked output is non-finite (a NaN input that the
    model masks out stays quiet). AMP overflow steps (a GradScaler still backing off) are not
    reported: the engine records them as ``AMP_OVERFLOW``. Severity ``"error"``.
    """

    kind = AlertKind.NONFINITE
    severity = "error"

    def __init__(self) -> None:
        super().__init__(0.0)
        self._depth = torch.zeros(0)
        self._module_index = torch.zeros(0)

    def prepare(self) -> None:
        layout = self.layout
        num_layers = layout.num_layers
        self._depth = 1.0 + torch.arange(1, num_layers + 1, device=layout.device) / (num_layers + 1)
        self._module_index = torch.arange(len(layout.modules), device=layout.device)

    def candidate_names(self) -> list[str]:
        return self.layout.names + list(self.layout.modules)

    def observe(self, obs: Observation) -> Detection:
        real = ~obs.overflow[0]
        grads_bad = ~obs.grads_finite[0]
        loss_bad = ~obs.loss_finite[0]
        checks = obs.forward
        if checks is None:
            input_bad = output_bad = torch.zeros((), dtype=torch.bool, device=real.device)
            module_hit = torch.zeros_like(self._module_index, dtype=torch.bool)
        else:
            input_bad, output_bad = checks.input_first, checks.output_bad
            module_hit = self._module_index == checks.module
        fired = ((grads_bad | output_bad) & real) | loss_bad
        origin = torch.where(
            input_bad,
            float(Origin.INPUT),
            torch.where(
                output_bad,
                float(Origin.FORWARD),
                torch.where(loss_bad, float(Origin.LOSS), float(Origin.BACKWARD)),
            ),
        )
        backward = origin == float(Origin.BACKWARD)
        layer_scores = torch.where(~finite(obs.norms[0]) & backward, self._depth, 0.0)
        module_scores = (module_hit & (origin == float(Origin.FORWARD))).float()
        scores = torch.cat([layer_scores, module_scores])
        return Detection(fired=fired[None], value=origin[None], scores=scores[None])

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        origin = Origin(int(value)) if value in (0.0, 1.0, 2.0, 3.0) else Origin.BACKWARD
        if origin is Origin.INPUT:
            return (
                "NaN/Inf in the input batch (origin: input): a tensor entering the model is "
                "non-finite before any module ran"
            )
        if origin is Origin.FORWARD and layers:
            if layers[0] == "":
                return (
                    "NaN/Inf first appears in the forward pass (origin: forward), in the model's "
                    "output, with finite inputs (check_activations=True names the first module "
                    "whose output is non-finite)"
                )
            return (
                "NaN/Inf first appears in the forward pass (origin: forward), in the output of "
                f"{layers[0]!r}, with finite inputs"
            )
        if origin is Origin.FORWARD:
            return "NaN/Inf first appears in the forward pass (origin: forward)"
        if origin is Origin.LOSS:
            return "the loss is NaN/Inf while the model's output is finite (origin: loss)"
        if layers:
            return (
                f"NaN/Inf gradients with a finite loss (origin: backward), first at layer "
                f"{format_layers(layers[:1])} (the deepest non-finite layer, where the backward "
                f"pass met them first); {len(layers)} layer(s) affected"
            )
        return "NaN/Inf gradients with a finite loss (origin: backward)"


class SaturationDetector(Detector):
    """Sigmoid/tanh-like outputs stuck in their flat regions (needs ``check_activations=True``).

    Reads the per-module fraction of outputs within
    :data:`~gradwatch.engine.thresholds.SATURATION_MARGIN` of a bound of the activation's range,
    measured by the :class:`~gradwatch.engine.activations.ActivationMonitor`. Fires once a
    module's fraction stayed above ``fraction`` for ``patience`` consecutive steps with a forward
    pass. Candidates are the hooked activation modules.

    Args:
        fraction: Fraction of saturated outputs above which a module is saturated.
        patience: Consecutive steps the condition must hold.
    """

    kind = AlertKind.SATURATION
    needs = "check_activations"
    run: torch.Tensor

    def __init__(
        self, fraction: float = SATURATION_FRACTION, patience: int = SATURATION_PATIENCE
    ) -> None:
        super().__init__(check_fraction("fraction", fraction))
        self.patience = check_int("patience", patience, minimum=1)
        self.add_state("run", 0.0, "activations")

    def candidate_names(self) -> list[str]:
        return list(self.layout.activation_names)

    def observe(self, obs: Observation) -> Detection:
        stats = obs.activations
        if stats is None or not self.layout.activation_names:
            return _quiet(len(self.layout.activation_names), self.layout.device)
        holds = stats.saturated > self.threshold
        self.run = torch.where(stats.ran, torch.where(holds, self.run + 1, 0.0), self.run)
        firing = self.run >= self.patience
        scores = torch.where(firing, stats.saturated, 0.0)
        return Detection(fired=firing.any()[None], value=scores.amax()[None], scores=scores[None])

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"{value:.0%} of the outputs of {format_layers(layers)} sit in the flat regions of "
            f"the activation for {self.patience}+ steps: almost no gradient passes through"
        )


class DeadUnitsDetector(Detector):
    """ReLU units that produce no positive output for many steps (``check_activations=True``).

    Reads, per rectifier unit (feature or channel), how many steps in a row it has been idle (the
    :class:`~gradwatch.engine.activations.ActivationMonitor` counts them, steps where its module
    ran). A module fires when at least ``fraction`` of its units have been idle for ``window``
    steps, or when every one of its units has been idle for ``total_window`` steps (a layer that
    died entirely is reported early). Candidates are the hooked activation modules.

    Args:
        fraction: Fraction of dead units at which a module is reported.
        window: Steps without a positive output after which a unit counts as dead.
        total_window: Steps after which a module none of whose units produced a positive output
            is reported (at most ``window``).
    """

    kind = AlertKind.DEAD_UNITS
    needs = "check_activations"

    def __init__(
        self,
        fraction: float = DEAD_FRACTION,
        window: int = DEAD_WINDOW,
        total_window: int = DEAD_TOTAL_WINDOW,
    ) -> None:
        super().__init__(check_fraction("fraction", fraction))
        self.window = check_int("window", window, minimum=1)
        self.total_window = min(self.window, check_int("total_window", total_window, minimum=1))

    def candidate_names(self) -> list[str]:
        return list(self.layout.activation_names)

    def observe(self, obs: Observation) -> Detection:
        stats = obs.activations
        count = len(self.layout.activation_names)
        if stats is None or not stats.idle_steps.numel():
            return _quiet(count, self.layout.device)
        idle = torch.stack([stats.idle_steps >= self.window, stats.idle_steps >= self.total_window])
        per_module = torch.zeros(2, count, device=idle.device)
        per_module.index_add_(1, stats.unit_module, idle.float())
        fraction = per_module / stats.units.clamp_min(1.0)
        over = (fraction[0] >= self.threshold) | (fraction[1] >= 1.0)
        scores = torch.where(over, torch.maximum(fraction[0], fraction[1]), 0.0)
        return Detection(fired=over.any()[None], value=scores.amax()[None], scores=scores[None])

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        if value >= 1.0:
            return (
                f"every unit of {format_layers(layers)} produced no positive output for "
                f"{self.total_window}+ steps (a dead ReLU layer): it passes no gradient"
            )
        return (
            f"{value:.0%} of the units of {format_layers(layers)} produced no positive output for "
            f"{self.window} steps (dead ReLUs): they pass no gradient"
        )


class StagnationDetector(Detector):
    """A layer's weights barely change: update/weight ratio tiny, sustained (``track_updates``).

    Reads ``obs.update_ratio``, the exact ``||Δw|| / ||w||`` of one update that the engine measures
    at every flush. Fires once a layer stayed below ``ratio`` for ``patience`` consecutive
    measurements, and keeps firing until a measurement shows it moving again. A measurement of an
    update that did not happen (AMP overflow, skipped step) is ignored.

    Args:
        ratio: Update/weight ratio below which a layer stagnates.
        patience: Consecutive measurements the condition must hold.
    """

    kind = AlertKind.STAGNATION
    needs = "track_updates"
    run: torch.Tensor
    ratio: torch.Tensor

    def __init__(
        self, ratio: float = STAGNATION_RATIO, patience: int = STAGNATION_PATIENCE
    ) -> None:
        super().__init__(check_fraction("ratio", ratio))
        self.patience = check_int("patience", patience, minimum=1)
        self.add_state("run", 0.0, "layers")
        self.add_state("ratio", 1.0, "layers")

    def observe(self, obs: Observation) -> Detection:
        if obs.update_ratio is not None and obs.update_applied is not None:
            tiny = obs.update_ratio < self.threshold
            applied = obs.update_applied
            self.run = torch.where(applied, torch.where(tiny, self.run + 1, 0.0), self.run)
            self.ratio = torch.where(applied, obs.update_ratio, self.ratio)
        firing = self.run >= self.patience
        scores = torch.where(firing, -torch.log10(self.ratio.clamp_min(1e-30)), 0.0)
        value = torch.where(firing, self.ratio, torch.inf).amin()
        return Detection(fired=firing.any()[None], value=value[None], scores=scores[None])

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"the weights of {format_layers(layers)} barely change: update/weight ratio "
            f"{value:.1e} (threshold {self.threshold:.0e}) over {self.patience} measurements; "
            "check their learning rate, whether they are frozen, or whether their gradient vanishes"
        )


def default_detectors(
    *, check_activations: bool = False, track_updates: bool = False
) -> list[Detector]:
    """The detectors ``detectors="default"`` means: vanishing, exploding (update size and gradient
    profile), spike, non-finite, zero gradient. :class:`NormGrowthDetector` is opt-in.

    With ``check_activations`` the saturation and dead-unit detectors join them, with
    ``track_updates`` the stagnation detector.
    """
    detectors: list[Detector] = [
        VanishingDetector(),
        ExplodingDetector(),
        ExplodingProfileDetector(),
        SpikeDetector(),
        NonFiniteDetector(),
        ZeroGradientDetector(),
    ]
    if check_activations:
        detectors += [SaturationDetector(), DeadUnitsDetector()]
    if track_updates:
        detectors.append(StagnationDetector())
    return detectors


def _quiet(count: int, device: torch.device) -> Detection:
    """A detection that never fires, with ``count`` zero scores."""
    zero = torch.zeros(1, device=device)
    return Detection(fired=zero > 0, value=zero, scores=torch.zeros(1, count, device=device))


def _quiet_block(k: int, count: int, device: torch.device) -> Detection:
    """A detection of ``k`` steps that never fires, with ``count`` zero scores per step."""
    zero = torch.zeros(k, device=device)
    return Detection(fired=zero > 0, value=zero, scores=torch.zeros(k, count, device=device))


def _check_ratio(name: str, value: float) -> float:
    """A ratio ``>= 1`` (a number), or a TypeError/ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number >= 1, got {value!r}")
    if not value >= 1.0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a number >= 1, got {value!r}")
    return float(value)
