"""``WatchConfig``: every option of a watch, validated once, shared by every frontend."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from gradwatch.engine.alerts import Alert
from gradwatch.engine.checks import check_bool, check_choice, check_int
from gradwatch.engine.detectors import Detector, default_detectors
from gradwatch.engine.layers import NamePatterns, Pattern, check_patterns
from gradwatch.engine.remedies import Remedy

NONFINITE_POLICIES = ("warn", "raise")


@dataclass(frozen=True)
class WatchConfig:
    """The options of a watch (the keyword arguments of ``GradWatch`` that are not objects of the
    training loop), checked at construction: a bad value raises naming the argument and the value.

    ``detectors="default"`` is resolved here into the detector objects it means (activation and
    update detectors join with ``check_activations``/``track_updates``).

    Example:
        >>> config = WatchConfig(log_every_n_steps=10, remedies=[])
        >>> [type(d).__name__ for d in config.detectors][:4]
        ['VanishingDetector', 'ExplodingDetector', 'ExplodingProfileDetector', 'SpikeDetector']

    Attributes:
        log_every_n_steps: Flush cadence (host transfer, alerts, per-layer scalars); >= 1.
        histogram_every_n_steps: Gradient histogram cadence; 0 disables histograms.
        detectors: The detector objects.
        remedies: The remedy objects, applied in order.
        check_activations: Forward hooks for saturation, dead units and the first non-finite output.
        track_updates: Measure the per-layer update/weight ratio on flush steps.
        on_alert: Called with each new alert, on the host.
        nonfinite: ``"warn"`` (alert) or ``"raise"`` (``GradientError`` from ``step``).
        window: Steps of history kept (at least ``log_every_n_steps``).
        include: Watch only the layers whose name matches one of these patterns: a string is a
            glob on the whole name (``"encoder.*"``), a compiled ``re.Pattern`` a regular
            expression searched in it; None watches every layer. The root layer matches as
            ``""`` and as ``"<root>"``.
        exclude: Leave out the layers whose name matches one of these patterns (after
            ``include``).
        probe_every_n_steps: Measure the gradients at every N-th step only (steps whose number is
            a multiple of N); the other steps cost almost nothing. Detectors see the probed steps
            (their patience and warm-up count probed steps) and are told the cadence at
            ``bind``. Remedies and ``nonfinite="raise"`` act on every step, so they need 1.
        fused: Where clipping and skipping remedies act: inside a fused optimizer's kernel
            (``grad_scale``/``found_inf``: no extra pass, no host read) when it is exact to do so
            (None), always (True: the watch raises if the optimizer does not allow it), or never
            (False: one pass over the gradients, the skip flag read on the host).
    """

    log_every_n_steps: int = 50
    histogram_every_n_steps: int = 0
    detectors: Sequence[Detector] | str = "default"
    remedies: Sequence[Remedy] = ()
    check_activations: bool = False
    track_updates: bool = False
    on_alert: Callable[[Alert], None] | None = None
    nonfinite: str = "warn"
    window: int = 1000
    include: NamePatterns = None
    exclude: NamePatterns = None
    probe_every_n_steps: int = 1
    fused: bool | None = None

    def __post_init__(self) -> None:
        check_int("log_every_n_steps", self.log_every_n_steps, minimum=1)
        check_int("probe_every_n_steps", self.probe_every_n_steps, minimum=1)
        object.__setattr__(self, "include", check_patterns("include", self.include))
        object.__setattr__(self, "exclude", check_patterns("exclude", self.exclude))
        check_int("histogram_every_n_steps", self.histogram_every_n_steps, minimum=0)
        check_int("window", self.window, minimum=1)
        check_bool("check_activations", self.check_activations)
        check_bool("track_updates", self.track_updates)
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(f"fused must be None, True or False, got {self.fused!r}")
        if self.on_alert is not None and not callable(self.on_alert):
            raise TypeError(f"on_alert must be callable or None, got {self.on_alert!r}")
        object.__setattr__(self, "detectors", tuple(self._resolve_detectors()))
        object.__setattr__(self, "remedies", tuple(_checked_remedies(self.remedies)))
        if self.probe_every_n_steps > 1:
            self._check_probe_cadence()

    @property
    def detector_objects(self) -> tuple[Detector, ...]:
        """The detectors (``"default"`` resolved)."""
        return cast("tuple[Detector, ...]", self.detectors)

    @property
    def layer_patterns(self) -> tuple[tuple[Pattern, ...] | None, tuple[Pattern, ...] | None]:
        """``include`` and ``exclude`` as tuples of patterns (None: not given)."""
        return cast("tuple[Pattern, ...] | None", self.include), cast(
            "tuple[Pattern, ...] | None", self.exclude
        )

    @property
    def history_window(self) -> int:
        """Steps of history kept: ``window``, at least one flush's worth."""
        return max(self.window, self.log_every_n_steps)

    def replace(self, **changes: Any) -> WatchConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def fresh_copy(self) -> WatchConfig:
        """A copy with its own detector and remedy objects (for a second watch)."""
        return copy.deepcopy(self)

    def check_optimizer(self, has_optimizer: bool) -> None:
        """Raises when a remedy needs the optimizer and there is none.

        Raises:
            ValueError: Naming the remedy and how to pass the optimizer.
        """
        for index, remedy in enumerate(self.remedies):
            if remedy.needs_optimizer and not has_optimizer:
                raise ValueError(
                    f"remedies[{index}] ({type(remedy).__name__}) acts on the optimizer: "
                    "pass it, GradWatch(model, optimizer, remedies=...)"
                )

    def _check_probe_cadence(self) -> None:
        """Remedies and ``nonfinite="raise"`` decide at every step: they need every step probed."""
        if self.remedies:
            names = [type(remedy).__name__ for remedy in self.remedies]
            raise ValueError(
                f"remedies {names} act on every step and need its gradient norms: they cannot be "
                f"used with probe_every_n_steps={self.probe_every_n_steps}; use "
                "probe_every_n_steps=1 (or no remedies)"
            )
        if self.nonfinite == "raise":
            raise ValueError(
                "nonfinite='raise' checks every step: it cannot be used with "
                f"probe_every_n_steps={self.probe_every_n_steps}; use probe_every_n_steps=1 or "
                "nonfinite='warn'"
            )

    def probes(self, step: int) -> bool:
        """Whether ``step`` is one whose gradients are measured (``probe_every_n_steps``)."""
        return step % self.probe_every_n_steps == 0

    def _resolve_detectors(self) -> list[Detector]:
        detectors = self.detectors
        if isinstance(detectors, str):
            if detectors != "default":
                raise ValueError(
                    f"detectors must be 'default' or a sequence of detectors, got {detectors!r}"
                )
            return default_detectors(
                check_activations=self.check_activations, track_updates=self.track_updates
            )
        if not isinstance(detectors, Sequence):
            raise TypeError(
                f"detectors must be 'default' or a sequence of detectors, got {detectors!r}"
            )
        checked: list[Detector] = []
        for index, detector in enumerate(detectors):
            if not isinstance(detector, Detector):
                raise TypeError(
                    f"detectors[{index}] must be a gradwatch detector (e.g. gw.SpikeDetector()), "
                    f"got {detector!r}"
                )
            checked.append(detector)
        return checked


def _checked_remedies(remedies: object) -> list[Remedy]:
    if not isinstance(remedies, Sequence) or isinstance(remedies, str):
        raise TypeError(f"remedies must be a sequence of remedies, got {remedies!r}")
    for index, remedy in enumerate(remedies):
        if not isinstance(remedy, Remedy):
            raise TypeError(
                f"remedies[{index}] must be a gradwatch remedy (e.g. gw.ZClip()), got {remedy!r}"
            )
    return list(remedies)
