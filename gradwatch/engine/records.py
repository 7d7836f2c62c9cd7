"""Records: the host-side data a flush hands to every sink."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.engine.alerts import Alert


@dataclass
class FlushRecord:
    """Everything materialised at one flush, as host values.

    Attributes:
        layer_names: Layers in forward order (columns of ``grad_norms``).
        steps: ``[k]`` steps recorded since the previous flush.
        grad_norms: ``[k, L]`` per-layer gradient norms of those steps (before remedies).
        total_norms: ``[k]`` total gradient norm of those steps (before remedies).
        clip_coefs: ``[k]`` gradient scale applied by remedies, or None without a clipping remedy.
        lr_scales: ``[k]`` learning-rate scale, or None when no learning-rate remedy runs.
        weight_norms: ``[L]`` per-layer weight norms at the last step.
        update_ratios: ``[L]`` last per-layer update/weight ratio, None without ``track_updates``.
        histograms: ``(step, layer name, histogram)`` per histogram taken; each histogram is a dict
            of ``add_histogram_raw`` keyword arguments.
        new_alerts: Alerts that materialised at this flush.
        alert_counts: Alerts so far per kind value.
        extra: Room for frontends (e.g. the Lightning global step).
    """

    layer_names: list[str]
    steps: np.ndarray
    grad_norms: np.ndarray
    total_norms: np.ndarray
    clip_coefs: np.ndarray | None
    lr_scales: np.ndarray | None
    weight_norms: np.ndarray
    update_ratios: np.ndarray | None
    histograms: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    new_alerts: list[Alert] = field(default_factory=list)
    alert_counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def last_step(self) -> int:
        """The newest step in this record (-1 when empty)."""
        return int(self.steps[-1]) if len(self.steps) else -1
