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
    """

    def __init__(self) -> None:
        super().__init__()
        self.layout = Layout.build(())

    def bind(self, layout: Layout) -> None:
        """Called by the engine once it knows the layers (and again if they change)."""
        self.layout = layout
        self.reset_state(layout.counts())
        self.prepare()

    def prepare(self) -> None:
        """Derives constants from :attr:`layout` (after the state was reset)."""
