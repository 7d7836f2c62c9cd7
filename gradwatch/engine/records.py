"""Records: the host-side data a flush hands to every sink."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.engine.alerts import Alert


@dataclass(frozen=True)
class WindowSummary:
    """Per-layer statistics of the steps of one flush, so that nothing between two log steps is
    lost: a spike or a NaN at any step shows in ``max`` or ``nonfinite``.

    Attributes:
        max: ``[L]`` largest finite norm of the window (NaN when no step had a finite norm).
        min: ``[L]`` smallest finite norm (NaN when none).
        median: ``[L]`` median of the finite norms (NaN when none).
        nonfinite: ``[L]`` number of steps whose norm was NaN or Inf.
        steps: Number of steps in the window.
    """

    max: np.ndarray
    min: np.ndarray
    median: np.ndarray
    nonfinite: np.ndarray
    steps: int

    @classmethod
    def of(cls, norms: np.ndarray) -> WindowSummary:
        """The summary of ``[k, L]`` norms (``k >= 1``).

        Example:
            >>> s = WindowSummary.of(np.array([[1.0, 2.0], [4.0, np.nan], [2.0, 3.0]]))
            >>> s.max.tolist(), s.median.tolist(), s.nonfinite.tolist()
            ([4.0, 3.0], [2.0, 2.5], [0, 1])
        """
        rows = np.asarray(norms, dtype=np.float64)
        finite = np.isfinite(rows)
        clean = np.where(finite, rows, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            return cls(
                max=np.nanmax(clean, axis=0),
                min=np.nanmin(clean, axis=0),
                median=np.nanmedian(clean, axis=0),
                nonfinite=(~finite).sum(axis=0),
                steps=len(rows),
            )


@dataclass
class FlushRecord:
    """Everything materialised at one flush, as host values.

    An early flush (out of the ``log_every_n_steps`` cadence, made so that a new warning or error
    reaches the user within a step or two) gives a record with alerts and no steps: its steps come
    with the next regular record, so that per-step values keep their cadence.

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
        """The newest step in this record: of its steps, else of its alerts (-1 when neither)."""
        if len(self.steps):
            return int(self.steps[-1])
        return max((alert.step for alert in self.new_alerts), default=-1)

    def window(self) -> WindowSummary | None:
        """Per-layer max, min, median and non-finite count over the steps of this record (None
        when it holds no step). Computed on demand, on the thread of the sink that asks."""
        if not len(self.steps):
            return None
        return WindowSummary.of(self.grad_norms)
