"""Detectors: vectorised, on-device recognisers of gradient pathologies.

Every detector sees each step's :class:`~gradwatch.step.StepObservation` and returns a
:class:`~gradwatch.step.Detection` made of device tensors; the watch keeps the per-step detections
until the next flush, where they become :class:`~gradwatch.alerts.Alert` objects on the host.

Per step a detector runs a handful of tiny tensor operations over the ``[L]`` per-layer vectors and
never synchronises with the host: running statistics and patience counters are device tensors, and
every decision is a ``torch.where``. Only :meth:`Detector.state_dict` (called at flush or checkpoint
time) reads them back.

All default thresholds live in the block below, each with the reason for its value.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from gradwatch.alerts import AlertKind
from gradwatch.step import Detection, StepObservation, WatchContext, finite
from gradwatch.validation import check_fraction, check_int, check_number

# -------------------------------------------------------------------------------------------------
# Thresholds: the one place where gradwatch's default sensitivities are decided.
#
# The "measured" figures come from the models of tests/zoo.py trained for 150 steps with SGD or Adam
# on synthetic data (see tests/test_detectors.py).

VANISHING_RATIO = 1e-2
"""Vanishing: geometric-mean gradient RMS of the first quarter of the layers over that of the last
quarter. Healthy models stay above ~3e-2 (an LSTM's recurrent layer against its head, the worst
measured), ReLU+He+BatchNorm, residual and CNN models above ~0.15; a default-initialised 20-layer
tanh MLP sits near 3e-4 and a sigmoid one near 1e-13. Below 1e-2 the first layers learn at least a
hundred times slower than the last ones under SGD."""

VANISHING_PATIENCE = 10
"""Vanishing: consecutive valid steps the ratio must stay below the threshold, so that one odd
batch never fires it; short enough to fire within the first few dozen steps."""

EXPLODING_RATIO = 50.0
"""Exploding: per-layer gradient norm over weight norm (both per element, RMS). Healthy models reach
~7 in their first steps (and less later); a tanh Elman RNN with recurrent spectral radius 3 over 30
steps gives ~180 at step 0. At 50 a single SGD step with learning rate 0.02 would replace the
weights entirely."""

EXPLODING_WEIGHT_FLOOR = 0.1
"""Exploding: the weight RMS a layer is compared with is at least this fraction of the median weight
RMS of the model, so that zero-initialised layers (residual branch outputs, biases) are not divided
by zero or by the tiny weights of their first updates."""

SPIKE_Z = 6.0
"""Spike: z-score of the log-norm against its EMA mean and deviation. Six deviations is far outside
batch-to-batch noise (whose log-norm deviation is typically 0.1-0.3)."""

SPIKE_MIN_RATIO = 3.0
"""Spike: the norm must also be at least this many times its EMA (geometric) mean, so that a very
steady norm (tiny deviation) does not fire on a modest change."""

SPIKE_BETA = 0.95
"""Spike: EMA decay of the log-norm mean and variance (a memory of ~20 steps), as in ZClip."""

SPIKE_WARMUP = 20
"""Spike: valid steps of a norm seen before it can spike (plain running mean meanwhile): the first
steps of training change norms fast and the statistics need samples."""

SATURATION_MARGIN = 0.01
"""Saturation: an output within this distance of a bound of its activation's range is in a flat
region (sigmoid outside [0.01, 0.99], where its slope is below 4% of its peak; |tanh| > 0.99, below
2%)."""

SATURATION_FRACTION = 0.5
"""Saturation: fraction of a module's outputs in the flat regions. At default initialisation
sigmoid/tanh networks have almost none; above half, most of the layer passes no gradient."""

SATURATION_PATIENCE = 20
"""Saturation: consecutive steps the fraction must stay above the threshold (transients while the
weights settle are ignored)."""

DEAD_FRACTION = 0.5
"""Dead units: fraction of a rectifier's units that never produced a positive output over a window.
A few dead units are normal; half the layer means its capacity is gone."""

DEAD_WINDOW = 50
"""Dead units: steps over which "ever active" is accumulated: over 50 batches a live unit fires."""

STAGNATION_RATIO = 1e-6
"""Stagnation: per-layer ``||Δw|| / ||w||`` of one update. Healthy training is ~1e-4 to 1e-2; below
1e-6 a float32 update moves each weight by a few units in the last place: the layer is frozen."""

STAGNATION_PATIENCE = 3
"""Stagnation: consecutive update measurements (one per flush with ``track_updates=True``) below the
threshold: one quiet update (e.g. a learning-rate warm-up at 0) is not stagnation."""


# -------------------------------------------------------------------------------------------------


class Detector:
    """Base class of every detector.

    Subclasses set ``kind``, implement :meth:`observe` and :meth:`message`, and keep their running
    statistics as device tensors created in :meth:`bind`.

    Attributes:
        kind: The alert kind this detector raises.
        severity: Severity of its alerts.
        threshold: The threshold reported with its alerts.
    """

    kind: ClassVar[AlertKind]
    windowed: ClassVar[bool] = False
    """Evaluated once per flush over the steps since the previous flush (:meth:`observe_window`,
    still on the device) instead of every step: for slow conditions that no remedy acts on."""
    severity: str = "warning"
    threshold: float = 0.0

    def bind(self, context: WatchContext) -> None:
        """Called once when the watch knows its layers; create device state here."""
        self.context = context

    def candidate_names(self) -> list[str]:
        """Names that :attr:`Detection.scores` index (the layers by default)."""
        return self.context.layer_names

    def observe(self, obs: StepObservation) -> Detection:
        """Updates the statistics with one step and says whether the condition holds."""
        raise NotImplementedError

    def observe_window(self, norms: torch.Tensor, totals: torch.Tensor) -> Detection:
        """Windowed detectors: verdicts for ``k`` steps at once, at the flush.

        Args:
            norms: ``[k, L]`` per-layer gradient norms of the steps since the last flush.
            totals: ``[k]`` their total norms (non-finite on invalid steps).

        Returns:
            A detection whose ``fired`` and ``value`` are ``[k]`` and ``scores`` ``[k, C]``.
        """
        raise NotImplementedError

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        """One sentence describing a detection with this value in these layers."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain-value state (floats, ints, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (after :meth:`bind`)."""


class VanishingDetector(Detector):
    """Early layers' gradients tiny compared with the last layers', sustained.

    Compares the scale-free per-layer gradient RMS (``norm / sqrt(numel)``): the geometric mean over
    the first quarter of the layers (forward order) against the last quarter. Layers whose gradient
    is exactly zero (e.g. behind a zero-initialised residual branch at step 0) carry no information
    and are left out; so are embeddings, whose gradients are row-sparse by construction. Needs at
    least two comparable layers. Fires once the ratio stayed below ``ratio`` for ``patience``
    consecutive valid steps; names the layers below ``ratio`` times the last quarter, tiniest first.

    A slow condition that no remedy acts on, so it is evaluated once per flush over the pending
    steps (``[k, L]`` on the device) rather than every step: no per-step cost.

    Example:
        >>> watch = GradWatch(model, detectors=[gw.VanishingDetector(ratio=1e-3)])  # doctest: +SKIP

    Args:
        ratio: Early/late gradient RMS ratio below which gradients vanish.
        patience: Consecutive valid steps the condition must hold.
    """

    kind = AlertKind.VANISHING
    windowed = True

    def __init__(self, ratio: float = VANISHING_RATIO, patience: int = VANISHING_PATIENCE) -> None:
        check_fraction("ratio", ratio)
        check_int("patience", patience, minimum=1)
        self.threshold = ratio
        self.patience = patience
        self._log_ratio = math.log10(ratio)

    def bind(self, context: WatchContext) -> None:
        super().bind(context)
        device = context.device
        sparse = (nn.Embedding, nn.EmbeddingBag)
        eligible = [
            i for i, layer in enumerate(context.layers) if not isinstance(layer.module, sparse)
        ]
        self._quarter = max(1, len(eligible) // 4)
        self._enabled = len(eligible) >= 2
        groups = eligible[: self._quarter] + eligible[-self._quarter :] if self._enabled else []
        self._group_index = torch.tensor(groups, dtype=torch.long, device=device)
        # log10(norm) + offset = log10(RMS) for eligible layers, NaN for the others.
        offset = -0.5 * torch.log10(context.numels.clamp_min(1.0))
        left_out = torch.ones(context.num_layers, dtype=torch.bool, device=device)
        left_out[eligible] = False
        self._offset = torch.where(left_out, torch.nan, offset)
        self._run = torch.zeros((), device=device)

    def observe_window(self, norms: torch.Tensor, totals: torch.Tensor) -> Detection:
        k = norms.shape[0]
        if not self._enabled:
            zero = torch.zeros(k, device=norms.device)
            return Detection(zero > 0, zero, torch.zeros(k, norms.shape[1], device=norms.device))
        log_rms = torch.log10(norms) + self._offset
        log_rms = torch.where(torch.isfinite(log_rms), log_rms, torch.nan)  # zeros carry no info
        groups = log_rms.index_select(1, self._group_index).view(k, 2, self._quarter)
        means = groups.nanmean(2)
        gap = means[:, 0] - means[:, 1]  # NaN when a group has no information: never holds
        valid = torch.isfinite(totals)
        below = gap < self._log_ratio
        # Run length of valid "below" steps, carried over flushes; invalid steps change nothing.
        counted = torch.cumsum((valid & below).float(), 0)
        resets = torch.where(valid & ~below, counted, -1.0).cummax(0).values
        run = torch.where(resets >= 0, counted - resets, self._run + counted)
        self._run = run[-1]
        # How far (in decades) each layer sits below ``ratio`` times the last layers: tiniest first.
        scores = (means[:, 1:] + self._log_ratio - log_rms).nan_to_num(0.0).clamp_min(0.0)
        return Detection(fired=run >= self.patience, value=torch.pow(10.0, gap), scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            "gradients vanish toward the input: the first layers' gradient RMS is "
            f"{value:.1e} times the last layers' (threshold {self.threshold:.0e}) for "
            f"{self.patience} steps in a row; {_names(layers)} barely learn"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"run": float(self._run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "run" in state:
            self._run.fill_(float(state["run"]))


class ExplodingDetector(Detector):
    """Gradients huge relative to their weights.

    Per layer, gradient RMS over weight RMS (the weight norms the watch refreshes at step 0 and at
    every flush). A layer's weight RMS is floored at ``weight_floor`` times the model's median, so
    zero-initialised layers are neither divided by zero nor by their first tiny updates. Fires at
    the very first step where a layer's ratio exceeds ``ratio``; invalid steps (NaN/Inf, AMP
    overflow) belong to the non-finite detector.

    Args:
        ratio: Gradient/weight RMS ratio above which gradients explode.
        weight_floor: Fraction of the median weight RMS below which weights count as that floor.
    """

    kind = AlertKind.EXPLODING

    def __init__(
        self, ratio: float = EXPLODING_RATIO, weight_floor: float = EXPLODING_WEIGHT_FLOOR
    ) -> None:
        check_number("ratio", ratio, low=0.0)
        check_fraction("weight_floor", weight_floor)
        self.threshold = ratio
        self.weight_floor = weight_floor

    def bind(self, context: WatchContext) -> None:
        super().bind(context)
        self._inv_sqrt_numel = context.numels.clamp_min(1.0).rsqrt()
        self._weights: torch.Tensor | None = None
        self._scale = self._inv_sqrt_numel

    def observe(self, obs: StepObservation) -> Detection:
        if obs.weight_norms is not self._weights:  # refreshed: recompute the per-layer scale once
            self._weights = obs.weight_norms
            weight_rms = obs.weight_norms * self._inv_sqrt_numel
            median = torch.where(weight_rms > 0, weight_rms, torch.nan).nanmedian()
            reference = torch.fmax(weight_rms, median * self.weight_floor)  # fmax ignores NaN
            inverse = torch.where(reference > 0, reference.reciprocal(), 0.0)
            self._scale = self._inv_sqrt_numel * inverse
        ratio = (obs.norms * self._scale).nan_to_num(0.0, 0.0, 0.0)
        over = ratio > self.threshold
        fired = obs.valid & over.any()
        return Detection(fired=fired, value=ratio.amax(), scores=torch.where(over, ratio, 0.0))

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"gradients explode: in {_names(layers)} the gradient is {value:.3g} times the size of "
            f"the weights (threshold {self.threshold:g}), so one update overshoots them"
        )


class SpikeDetector(Detector):
    """A sudden jump of the total or a per-layer gradient norm against its own recent history.

    Keeps an EMA mean and variance of the log-norm of every layer and of the total (Welford-style
    exponential moving statistics, a plain running mean for the first ``warmup`` samples). A norm
    spikes when it is both ``z_threshold`` deviations and ``min_ratio`` times above its mean. Only
    valid steps enter the statistics (no NaN/Inf, no AMP overflow) and exact zeros are skipped;
    a spiking value enters them clamped to the threshold, so one spike does not blind the detector.

    Args:
        z_threshold: Deviations above the EMA mean (of log-norms) that count as a spike.
        min_ratio: The norm must also be at least this many times its EMA (geometric) mean.
        beta: EMA decay of the mean and variance, in (0, 1).
        warmup: Samples of a norm needed before it can spike.
    """

    kind = AlertKind.SPIKE

    def __init__(
        self,
        z_threshold: float = SPIKE_Z,
        min_ratio: float = SPIKE_MIN_RATIO,
        beta: float = SPIKE_BETA,
        warmup: int = SPIKE_WARMUP,
    ) -> None:
        check_number("z_threshold", z_threshold, low=0.0)
        if not isinstance(min_ratio, int | float) or not min_ratio >= 1.0:
            raise ValueError(f"min_ratio must be a number >= 1, got {min_ratio!r}")
        check_fraction("beta", beta)
        check_int("warmup", warmup, minimum=1)
        self.threshold = z_threshold
        self.min_ratio = min_ratio
        self.beta = beta
        self.warmup = warmup
        self._log_min_ratio = math.log(min_ratio)

    def bind(self, context: WatchContext) -> None:
        super().bind(context)
        size = context.num_layers + 1  # every layer, then the total
        self._mean = torch.zeros(size, device=context.device)
        self._var = torch.zeros(size, device=context.device)
        self._count = torch.zeros(size, device=context.device)
        self._prepare()

    def _prepare(self) -> None:
        """Derives next step's thresholds from the statistics (done once per update)."""
        warm = self._count >= self.warmup
        self._cap = torch.where(warm, self.threshold * self._var.sqrt(), torch.inf)
        self._gate = self._cap.clamp_min(self._log_min_ratio)  # z deviations and min_ratio
        self._jump = torch.where(warm, self._log_min_ratio, torch.inf)[: self.context.num_layers]
        self._weight = (self._count + 1).reciprocal().clamp_min(1.0 - self.beta)

    def observe(self, obs: StepObservation) -> Detection:
        num_layers = self.context.num_layers
        deviation = torch.cat([obs.norms, obs.total_norm.reshape(1)]).log() - self._mean
        present = finite(deviation) & obs.valid
        spiking = (deviation > self._gate) & present
        fired = spiking.any()
        # Running mean while warming up, EMA after; a spike enters capped at the threshold.
        delta = torch.where(present, torch.minimum(deviation, self._cap), 0.0)
        weight = self._weight * present
        self._mean = torch.addcmul(self._mean, weight, delta)
        self._var = (1.0 - weight) * torch.addcmul(self._var, weight * delta, delta)
        self._count = self._count + present
        self._prepare()
        value = torch.where(spiking, deviation, -torch.inf).amax().exp()
        layer_deviation = deviation[:num_layers]
        scores = torch.where(fired & (layer_deviation > self._jump), layer_deviation, 0.0)
        return Detection(fired=fired, value=value, scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        where = f" (largest jumps in {_names(layers)})" if layers else ""
        return (
            f"the gradient norm jumped to {value:.3g} times its recent typical value{where}: "
            "the run may be diverging (learning rate too high, a bad batch)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": self._mean.tolist(),
            "var": self._var.tolist(),
            "count": self._count.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("mean", "var", "count"):
            values = state.get(key)
            if values is not None and len(values) == self._mean.numel():
                getattr(self, f"_{key}").copy_(torch.tensor(values, dtype=torch.float32))
        self._prepare()


class NonFiniteDetector(Detector):
    """NaN/Inf in gradients, in the loss, and (with ``check_activations=True``) in activations.

    The alert names, most responsible first: the first activation module in forward order whose
    output is non-finite (where the forward pass broke), then the layers with non-finite gradients,
    deepest first (backward starts at the output, so the deepest non-finite layer is where the
    backward pass met the NaN first). A loss that is NaN/Inf fires too. AMP overflow steps (a
    GradScaler still backing off) are not reported here: the watch records them as ``AMP_OVERFLOW``.
    Severity ``"error"``.
    """

    kind = AlertKind.NONFINITE
    severity = "error"

    def bind(self, context: WatchContext) -> None:
        super().bind(context)
        device = context.device
        num_layers = context.num_layers
        self._activation_names: list[str] = (
            list(context.activations.names) if context.activations is not None else []
        )
        count = len(self._activation_names)
        self._depth = 1.0 + torch.arange(1, num_layers + 1, device=device) / (num_layers + 1)
        self._no_activation = torch.zeros(count, device=device)
        self._count = count

    def candidate_names(self) -> list[str]:
        return self.context.layer_names + self._activation_names

    def observe(self, obs: StepObservation) -> Detection:
        real = ~obs.overflow
        bad_layers = ~finite(obs.sq_norms) & real
        fired = (~obs.grads_finite & real) | ~obs.loss_finite
        scores = torch.where(bad_layers, self._depth, 0.0)
        value = bad_layers.sum()
        if self._count:
            stats = obs.activations
            if stats is None:
                activation_scores = self._no_activation
            else:
                fired = fired | stats.nonfinite.any()
                order = 3.0 + (self._count - stats.forward_rank) / (self._count + 1)
                activation_scores = stats.nonfinite.float() * order
            scores = torch.cat([scores, activation_scores])
        return Detection(fired=fired, value=value, scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        if layers and layers[0] in self._activation_names:
            return (
                f"NaN/Inf first appears in the forward pass, in the output of "
                f"{_names(layers[:1])}; {value:g} layer gradient(s) are non-finite"
            )
        if layers:
            return (
                f"NaN/Inf gradients start at layer {_names(layers[:1])} (the deepest non-finite "
                f"layer, where the backward pass met them first); {value:g} layer(s) affected"
            )
        return "the loss passed to step() is NaN/Inf"


class SaturationDetector(Detector):
    """Sigmoid/tanh-like outputs stuck in their flat regions (needs ``check_activations=True``).

    Reads the per-module fraction of outputs within :data:`SATURATION_MARGIN` of a bound of the
    activation's range, measured by the :class:`~gradwatch.activations.ActivationMonitor`. Fires
    once a module's fraction stayed above ``fraction`` for ``patience`` consecutive steps with a
    forward pass. Candidates are the hooked activation modules.

    Args:
        fraction: Fraction of saturated outputs above which a module is saturated.
        patience: Consecutive steps the condition must hold.
    """

    kind = AlertKind.SATURATION

    def __init__(
        self, fraction: float = SATURATION_FRACTION, patience: int = SATURATION_PATIENCE
    ) -> None:
        check_fraction("fraction", fraction)
        check_int("patience", patience, minimum=1)
        self.threshold = fraction
        self.patience = patience

    def bind(self, context: WatchContext) -> None:
        super().bind(context)
        self._names = _activation_names(context, type(self).__name__)
        self._run = torch.zeros(len(self._names), device=context.device)
        self._quiet = _quiet(len(self._names), context.device)

    def candidate_names(self) -> list[str]:
        return self._names

    def observe(self, obs: StepObservation) -> Detection:
        stats = obs.activations
        if stats is None or not self._names:
            return self._quiet
        holds = stats.saturated > self.threshold
        self._run = torch.where(stats.ran, torch.where(holds, self._run + 1, 0.0), self._run)
        firing = self._run >= self.patience
        scores = torch.where(firing, stats.saturated, 0.0)
        return Detection(fired=firing.any(), value=scores.amax(), scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"{value:.0%} of the outputs of {_names(layers)} sit in the flat regions of the "
            f"activation for {self.patience}+ steps: almost no gradient passes through"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"run": self._run.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run = state.get("run")
        if run is not None and len(run) == self._run.numel():
            self._run.copy_(torch.tensor(run, dtype=torch.float32))


class DeadUnitsDetector(Detector):
    """ReLU units that never activate over a window (needs ``check_activations=True``).

    Every ``window`` steps reads, per rectifier module, the fraction of units (features or
    channels) that produced no positive output during the window, then starts a new window. Fires
    at the end of a window where a module's dead fraction is at least ``fraction``. A resumed run
    starts a fresh window.

    Args:
        fraction: Fraction of dead units at which a module is reported.
        window: Steps over which a unit must fire at least once.
    """

    kind = AlertKind.DEAD_UNITS

    def __init__(self, fraction: float = DEAD_FRACTION, window: int = DEAD_WINDOW) -> None:
        check_fraction("fraction", fraction)
        check_int("window", window, minimum=1)
        self.threshold = fraction
        self.window = window

    def bind(self, context: WatchContext) -> None:
        super().bind(context)
        self._names = _activation_names(context, type(self).__name__)
        self._quiet = _quiet(len(self._names), context.device)
        self._steps = 0

    def candidate_names(self) -> list[str]:
        return self._names

    def observe(self, obs: StepObservation) -> Detection:
        stats = obs.activations
        if stats is None or not self._names:
            return self._quiet
        self._steps += 1
        if self._steps % self.window:
            return self._quiet
        dead = stats.monitor.dead_fractions()
        if dead is None:
            return self._quiet
        over = dead >= self.threshold
        scores = torch.where(over, dead, 0.0)
        return Detection(fired=over.any(), value=scores.amax(), scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"{value:.0%} of the units of {_names(layers)} never activated over the last "
            f"{self.window} steps (dead ReLUs): they pass no gradient"
        )


class StagnationDetector(Detector):
    """A layer's weights barely change: update/weight ratio tiny, sustained (``track_updates``).

    Reads ``obs.update_ratio``, the exact ``||Δw|| / ||w||`` of one update that the watch measures
    at every flush. Fires once a layer stayed below ``ratio`` for ``patience`` consecutive
    measurements, and keeps firing until a measurement shows it moving again. A measurement of an
    update that did not happen (AMP overflow, skipped step) is ignored.

    Args:
        ratio: Update/weight ratio below which a layer stagnates.
        patience: Consecutive measurements the condition must hold.
    """

    kind = AlertKind.STAGNATION

    def __init__(
        self, ratio: float = STAGNATION_RATIO, patience: int = STAGNATION_PATIENCE
    ) -> None:
        check_fraction("ratio", ratio)
        check_int("patience", patience, minimum=1)
        self.threshold = ratio
        self.patience = patience

    def bind(self, context: WatchContext) -> None:
        super().bind(context)
        device = context.device
        self._run = torch.zeros(context.num_layers, device=device)
        self._ratio = torch.ones(context.num_layers, device=device)
        self._previous: StepObservation | None = None

    def observe(self, obs: StepObservation) -> Detection:
        ratio = obs.update_ratio
        previous, self._previous = self._previous, obs
        if ratio is not None and previous is not None and not previous.skip:
            updated = ~previous.overflow  # the measured update is the previous step's
            tiny = ratio < self.threshold
            self._run = torch.where(updated, torch.where(tiny, self._run + 1, 0.0), self._run)
            self._ratio = torch.where(updated, ratio, self._ratio)
        firing = self._run >= self.patience
        scores = torch.where(firing, -torch.log10(self._ratio.clamp_min(1e-30)), 0.0)
        value = torch.where(firing, self._ratio, torch.inf).amin()
        return Detection(fired=firing.any(), value=value, scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"the weights of {_names(layers)} barely change: update/weight ratio {value:.1e} "
            f"(threshold {self.threshold:.0e}) over {self.patience} measurements; check their "
            "learning rate, whether they are frozen, or whether their gradient vanishes"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"run": self._run.tolist(), "ratio": self._ratio.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("run", "ratio"):
            values = state.get(key)
            if values is not None and len(values) == self._run.numel():
                getattr(self, f"_{key}").copy_(torch.tensor(values, dtype=torch.float32))


def default_detectors(
    *, check_activations: bool = False, track_updates: bool = False
) -> list[Detector]:
    """The detectors ``detectors="default"`` means: vanishing, exploding, spike, non-finite.

    With ``check_activations`` the saturation and dead-unit detectors join them, with
    ``track_updates`` the stagnation detector.
    """
    detectors: list[Detector] = [
        VanishingDetector(),
        ExplodingDetector(),
        SpikeDetector(),
        NonFiniteDetector(),
    ]
    if check_activations:
        detectors += [SaturationDetector(), DeadUnitsDetector()]
    if track_updates:
        detectors.append(StagnationDetector())
    return detectors


def _activation_names(context: WatchContext, detector: str) -> list[str]:
    if context.activations is None:
        warnings.warn(
            f"gradwatch: {detector} needs the activation hooks: pass "
            "GradWatch(..., check_activations=True); it stays quiet",
            RuntimeWarning,
            stacklevel=4,
        )
        return []
    return list(context.activations.names)


def _quiet(count: int, device: torch.device) -> Detection:
    """A detection that never fires, with ``count`` zero scores."""
    zero = torch.zeros((), device=device)
    return Detection(fired=zero > 0, value=zero, scores=torch.zeros(count, device=device))


def _names(layers: tuple[str, ...], limit: int = 3) -> str:
    shown = ", ".join(repr(name) if name else "<root>" for name in layers[:limit])
    if len(layers) > limit:
        shown += f" and {len(layers) - limit} more"
    return shown or "some layers"
