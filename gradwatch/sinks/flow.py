"""The gradient-flow image: a layers x steps heatmap of log10 gradient norms."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from gradwatch.engine.text import display_name

MIN_COLOUR_DECADES = 4.0  # the colour scale spans at least this many decades


class GradientFlow:
    """A bounded layers x steps buffer of log10 gradient norms, and its picture.

    Steps enter one row of per-layer norms at a time; each column holds the mean log10 norm of
    ``stride`` consecutive steps. When the buffer is full, neighbouring columns are merged and the
    stride doubles, so the picture always spans the whole run in at most ``max_columns`` columns.

    Args:
        max_columns: Maximum number of columns kept (>= 2).
    """

    def __init__(self, max_columns: int = 256) -> None:
        self.max_columns = max_columns
        self.stride = 1
        self._columns: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []
        self.first_step: int | None = None
        self.last_step = 0

    def add(self, steps: np.ndarray, norms: np.ndarray) -> None:
        """Appends ``[k, L]`` per-layer norms of ``k`` consecutive steps numbered ``steps``."""
        rows = np.asarray(norms, dtype=np.float64)
        if rows.ndim != 2 or not len(rows):
            return
        if self.first_step is None:
            self.first_step = int(steps[0])
        self.last_step = int(steps[-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(rows)
        for row in logs:
            self._pending.append(row)
            if len(self._pending) == self.stride:
                self._columns.append(_mean_columns(self._pending))
                self._pending = []
                if len(self._columns) > self.max_columns:
                    pairs = zip(self._columns[0::2], self._columns[1::2], strict=False)
                    self._columns = [_mean_columns(list(pair)) for pair in pairs]
                    self.stride *= 2

    def grid(self) -> np.ndarray:
        """``[L, C]`` log10 norms (NaN for non-finite gradients, -inf for zero gradients)."""
        columns = self._columns + ([_mean_columns(self._pending)] if self._pending else [])
        if not columns:
            return np.zeros((0, 0))
        return np.stack(columns, axis=1)

    def render(self, layer_names: list[str], plot: FlowPlot | None) -> np.ndarray | None:
        """The picture as ``[H, W, 3]`` uint8 (None before the first step).

        Args:
            layer_names: Row labels.
            plot: Draws a labelled plot; None draws a plain colour map.
        """
        grid = self.grid()
        if grid.size == 0 or grid.shape[0] != len(layer_names):
            return None
        finite = grid[np.isfinite(grid)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
        if high - low < MIN_COLOUR_DECADES:  # a healthy spread of norms stays one colour
            middle = 0.5 * (low + high)
            low, high = middle - 0.5 * MIN_COLOUR_DECADES, middle + 0.5 * MIN_COLOUR_DECADES
        clipped = np.where(np.isposinf(grid), high, np.where(np.isneginf(grid), low, grid))
        if plot is not None:
            start = self.first_step or 0
            span = (start - 0.5 * self.stride, self.last_step + 0.5 * self.stride)
            return plot.draw(clipped, layer_names, span, low, high)
        return _render_plain(clipped, low, high)


def _mean_columns(columns: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(columns)
    if len(stacked) == 1:
        return stacked[0]
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        return np.nanmean(stacked, axis=0)


# A perceptually uniform ramp (viridis anchors); NaN cells are drawn in magenta.
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_NAN_COLOUR = np.array([255, 0, 255], dtype=np.uint8)


def _render_plain(grid: np.ndarray, low: float, high: float) -> np.ndarray:
    """A plain colour map of ``grid`` (no axes), each cell scaled up to a visible block."""
    rows, cols = grid.shape
    position = np.clip((np.nan_to_num(grid, nan=low) - low) / (high - low), 0.0, 1.0)
    scaled = position * (len(_RAMP) - 1)
    index = np.minimum(scaled.astype(np.int64), len(_RAMP) - 2)
    fraction = (scaled - index)[..., None]
    rgb = (_RAMP[index] * (1.0 - fraction) + _RAMP[index + 1] * fraction).astype(np.uint8)
    rgb[np.isnan(grid)] = _NAN_COLOUR
    cell_height = int(np.clip(256 // max(rows, 1), 4, 16))
    cell_width = int(np.clip(512 // max(cols, 1), 1, 16))
    return np.repeat(np.repeat(rgb, cell_height, axis=0), cell_width, axis=1)


class FlowPlot:
    """A labelled heatmap drawn off-screen on matplotlib's Agg canvas (no pyplot state).

    The figure is built once per set of layers and only its data, extent and colour limits change
    from one drawing to the next, which halves the cost of a drawing.
    """

    def __init__(self) -> None:
        self._layer_names: list[str] | None = None
        self._figure: Any = None
        self._image: Any = None

    def draw(
        self,
        grid: np.ndarray,
        layer_names: list[str],
        span: tuple[float, float],
        low: float,
        high: float,
    ) -> np.ndarray:
        """Draws ``grid`` (rows: layers) and returns the pixels as ``[H, W, 3]`` uint8."""
        if self._layer_names != layer_names:
            self._build(grid, layer_names)
        self._image.set_data(np.ma.masked_invalid(grid))
        self._image.set_extent((span[0], span[1], len(layer_names) - 0.5, -0.5))
        self._image.set_clim(low, high)
        self._figure.canvas.draw()
        rgba = np.asarray(self._figure.canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3])

    def _build(self, grid: np.ndarray, layer_names: list[str]) -> None:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = len(layer_names)
        figure = Figure(figsize=(8.0, min(2.2 + 0.2 * rows, 14.0)), dpi=80)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        colour_map = matplotlib.colormaps["viridis"].with_extremes(bad="magenta")
        image = axes.imshow(
            np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap=colour_map
        )
        ticks = list(range(0, rows, max(1, rows // 40)))
        axes.set_yticks(ticks, [display_name(layer_names[i]) for i in ticks], fontsize=7)
        axes.set_xlabel("step")
        axes.set_ylabel("layer (forward order)")
        axes.set_title("gradient flow: log10 gradient norm per layer (magenta: NaN/Inf)")
        figure.colorbar(image, ax=axes, label="log10 gradient norm")
        figure.tight_layout()
        self._figure, self._image, self._layer_names = figure, image, list(layer_names)


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
