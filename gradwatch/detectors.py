"""Detectors: vectorised, on-device recognisers of gradient pathologies.

Every detector sees each step's :class:`~gradwatch.step.StepObservation` and returns a
:class:`~gradwatch.step.Detection` made of device tensors; the watch keeps the per-step detections
until the next flush, where they become :class:`~gradwatch.alerts.Alert` objects on the host.
"""

from __future__ import annotations

from typing import Any, ClassVar

from gradwatch.alerts import AlertKind
from gradwatch.step import Detection, StepObservation, WatchContext


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

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        """One sentence describing a detection with this value in these layers."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain-value state (floats, ints, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (after :meth:`bind`)."""


def default_detectors(*, check_activations: bool = False, track_updates: bool = False) -> list[Detector]:
    """The detectors ``detectors="default"`` means: vanishing, exploding, spike, non-finite.

    With ``check_activations`` the saturation and dead-unit detectors join them, with
    ``track_updates`` the stagnation detector.
    """
    return []
