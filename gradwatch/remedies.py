"""Remedies: act on the gradients or the update of a step, in the order given."""

from __future__ import annotations

from typing import Any, ClassVar

from gradwatch.step import StepObservation, WatchContext


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
