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
from gradwatch.engine.observation import Detection, Observation, finite
from gradwatch.engine.origin import Origin
from gradwatch.engine.roles import Role, role_of
from gradwatch.engine.text import format_layers
from gradwatch.engine.thresholds import (
    DEAD_FRACTION,
    DEAD_WINDOW,
    EXPLODING_RATIO,
    EXPLODING_WEIGHT_FLOOR,
    SATURATION_FRACTION,
    SATURATION_PATIENCE,
    SPIKE_BETA,
    SPIKE_MIN_RATIO,
    SPIKE_WARMUP,
    SPIKE_Z,
    STAGNATION_PATIENCE,
    STAGNATION_RATIO,
    VANISHING_PATIENCE,
    VANISHING_RATIO,
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


class VanishingDetector(Detector):
    """Early layers' gradients tiny compared with the last layers', sustained.

    Compares the scale-free per-layer gradient RMS (``norm / sqrt(numel)``): the geometric mean over
    the first quarter of the layers (forward order) against the last quarter. Layers whose gradient
    is exactly zero (e.g. behind a zero-initialised residual branch at step 0) carry no information
    and are left out; so are embeddings, whose gradients are row-sparse by construction. Needs at
    least two comparable layers. Fires once the ratio stayed below ``ratio`` for ``patience``
    consecutive valid steps; names the layers below ``ratio`` times the last quarter, tiniest first.

    A slow condition that no remedy acts on: it runs at the flush over the pending steps.

    Example:
        >>> detector = VanishingDetector(ratio=1e-3)

    Args:
        ratio: Early/late gradient RMS ratio below which gradients vanish.
        patience: Consecutive valid steps the condition must hold.
    """

    kind = AlertKind.VANISHING
    cadence = "flush"
    run: torch.Tensor

    def __init__(self, ratio: float = VANISHING_RATIO, patience: int = VANISHING_PATIENCE) -> None:
        super().__init__(check_fraction("ratio", ratio))
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

    def observe(self, obs: Observation) -> Detection:
        k, num_layers = obs.norms.shape
        if not self._group_index.numel():
            zero = torch.zeros(k, device=obs.norms.device)
            return Detection(zero > 0, zero, torch.zeros(k, num_layers, device=obs.norms.device))
        log_rms = torch.log10(obs.norms) + self._offset
        log_rms = torch.where(torch.isfinite(log_rms), log_rms, torch.nan)  # zeros carry no info
        groups = log_rms.index_select(1, self._group_index).view(k, 2, self._quarter)
        means = groups.nanmean(2)
        gap = means[:, 0] - means[:, 1]  # NaN when a group has no information: never holds
        below = gap < self._log_ratio
        # Run length of valid "below" steps, carried over flushes; invalid steps change nothing.
        counted = torch.cumsum((obs.valid & below).float(), 0)
        resets = torch.where(obs.valid & ~below, counted, -1.0).cummax(0).values
        run = torch.where(resets >= 0, counted - resets, self.run + counted)
        self.run = run[-1]
        # How far (in decades) each layer sits below ``ratio`` times the last layers: tiniest first.
        scores = (means[:, 1:] + self._log_ratio - log_rms).nan_to_num(0.0).clamp_min(0.0)
        return Detection(fired=run >= self.patience, value=torch.pow(10.0, gap), scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            "gradients vanish toward the input: the first layers' gradient RMS is "
            f"{value:.1e} times the last layers' (threshold {self.threshold:.0e}) for "
            f"{self.patience} steps in a row; {format_layers(layers)} barely learn"
        )


class ExplodingDetector(Detector):
    """Gradients huge relative to their weights.

    Per layer, gradient RMS over weight RMS (the weight norms the engine refreshes at step 0 and at
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
        super().__init__(check_number("ratio", ratio, low=0.0))
        self.weight_floor = check_fraction("weight_floor", weight_floor)
        self._inv_sqrt_numel = torch.zeros(0)
        self._weights = torch.zeros(0)
        self._scale = torch.zeros(0)

    def prepare(self) -> None:
        self._inv_sqrt_numel = self.layout.numels.clamp_min(1.0).rsqrt()
        self._weights = torch.zeros(0)
        self._scale = self._inv_sqrt_numel

    def observe(self, obs: Observation) -> Detection:
        if obs.weight_norms is not self._weights:  # refreshed: recompute the per-layer scale once
            self._weights = obs.weight_norms
            weight_rms = obs.weight_norms * self._inv_sqrt_numel
            median = torch.where(weight_rms > 0, weight_rms, torch.nan).nanmedian()
            reference = torch.fmax(weight_rms, median * self.weight_floor)  # fmax ignores NaN
            inverse = torch.where(reference > 0, reference.reciprocal(), 0.0)
            self._scale = self._inv_sqrt_numel * inverse
        ratio = (obs.norms * self._scale).nan_to_num(0.0, 0.0, 0.0)
        over = ratio > self.threshold
        fired = obs.valid & over.any(1)
        return Detection(fired=fired, value=ratio.amax(1), scores=torch.where(over, ratio, 0.0))

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return (
            f"gradients explode: in {format_layers(layers)} the gradient is {value:.3g} times the "
            f"size of the weights (threshold {self.threshold:g}), so one update overshoots them"
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
    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        z_threshold: float = SPIKE_Z,
        min_ratio: float = SPIKE_MIN_RATIO,
        beta: float = SPIKE_BETA,
        warmup: int = SPIKE_WARMUP,
    ) -> None:
        super().__init__(check_number("z_threshold", z_threshold, low=0.0))
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, int | float):
            raise TypeError(f"min_ratio must be a number >= 1, got {min_ratio!r}")
        if not min_ratio >= 1.0 or not math.isfinite(min_ratio):
            raise ValueError(f"min_ratio must be a number >= 1, got {min_ratio!r}")
        self.min_ratio = float(min_ratio)
        self.beta = check_fraction("beta", beta)
        self.warmup = check_int("warmup", warmup, minimum=1)
        self._log_min_ratio = math.log(min_ratio)
        self.add_state("mean", 0.0, "layers+1")  # every layer, then the total
        self.add_state("var", 0.0, "layers+1")
        self.add_state("count", 0.0, "layers+1")
        self._cap = torch.zeros(0)
        self._gate = torch.zeros(0)
        self._jump = torch.zeros(0)
        self._weight = torch.zeros(0)

    def prepare(self) -> None:
        """Derives next step's thresholds from the statistics (done once per update)."""
        warm = self.count >= self.warmup
        self._cap = torch.where(warm, self.threshold * self.var.sqrt(), torch.inf)
        self._gate = self._cap.clamp_min(self._log_min_ratio)  # z deviations and min_ratio
        self._jump = torch.where(warm, self._log_min_ratio, torch.inf)[: self.layout.num_layers]
        self._weight = (self.count + 1).reciprocal().clamp_min(1.0 - self.beta)

    def observe(self, obs: Observation) -> Detection:
        num_layers = self.layout.num_layers
        deviation = torch.cat([obs.norms[0], obs.totals]).log() - self.mean
        present = finite(deviation) & obs.valid
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
    steps. Candidates are the hooked activation modules.

    Args:
        fraction: Fraction of dead units at which a module is reported.
        window: Steps without a positive output after which a unit counts as dead.
    """

    kind = AlertKind.DEAD_UNITS
    needs = "check_activations"

    def __init__(self, fraction: float = DEAD_FRACTION, window: int = DEAD_WINDOW) -> None:
        super().__init__(check_fraction("fraction", fraction))
        self.window = check_int("window", window, minimum=1)

    def candidate_names(self) -> list[str]:
        return list(self.layout.activation_names)

    def observe(self, obs: Observation) -> Detection:
        stats = obs.activations
        count = len(self.layout.activation_names)
        if stats is None or not stats.idle_steps.numel():
            return _quiet(count, self.layout.device)
        dead = (stats.idle_steps >= self.window).float()
        per_module = torch.zeros(count, device=dead.device).index_add_(0, stats.unit_module, dead)
        fraction = per_module / stats.units.clamp_min(1.0)
        over = fraction >= self.threshold
        scores = torch.where(over, fraction, 0.0)
        return Detection(fired=over.any()[None], value=scores.amax()[None], scores=scores[None])

    def message(self, value: float, layers: tuple[str, ...]) -> str:
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


def _quiet(count: int, device: torch.device) -> Detection:
    """A detection that never fires, with ``count`` zero scores."""
    zero = torch.zeros(1, device=device)
    return Detection(fired=zero > 0, value=zero, scores=torch.zeros(1, count, device=device))
