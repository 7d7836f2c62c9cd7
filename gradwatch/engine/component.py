"""``Component``: what detectors and remedies share, declared state bound to the watched layers."""

from __future__ import annotations

from gradwatch.engine.layers import Layout
from gradwatch.engine.state import Stateful


class Component(Stateful):
    """Base of detectors and remedies.

    Subclasses declare their state with :meth:`add_state` in ``__init__`` and derive
    layout-dependent constants in :meth:`prepare`.

    Attributes:
        layout: The watched layers (set by :meth:`bind`).
        probe_every_n_steps: Steps between two observations of a step-cadence component (the
            watch's ``probe_every_n_steps``, set by :meth:`bind`): patience, warm-up and EMA
            horizons counted in observations span that many times more training steps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layout = Layout.build(())
        self.probe_every_n_steps = 1

    def bind(self, layout: Layout, probe_every_n_steps: int = 1) -> None:
        """Called by the engine once it knows the layers (and again if they change).

        Args:
            layout: The watched layers.
            probe_every_n_steps: Training steps between two observations.
        """
        self.layout = layout
        self.probe_every_n_steps = probe_every_n_steps
        self.reset_state(layout.counts())
        self.prepare()

    def prepare(self) -> None:
        """Derives constants from :attr:`layout` (after the state was reset)."""
