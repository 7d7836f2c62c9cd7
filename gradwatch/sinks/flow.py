"""The gradient-flow image: a layers x steps heatmap of log10 gradient norms.

Made to be read at a glance and compared between runs:

- one fixed, absolute colour scale (:data:`LOG10_RANGE`, 1e-8 to 1e4 by default), the same for
  every run and every drawing; norms beyond it take the end colours;
- NaN and Inf gradients are always magenta, layers without gradient (norm 0) light grey, whatever
  the run's length: when old steps are merged to keep the picture bounded, a merged cell shows the
  largest norm of its steps, and NaN/Inf win (a spike or a NaN is never averaged away, and no
  column is dropped);
- drawn :data:`WIDTH_PX` pixels wide, the width of an image card in TensorBoard's IMAGES tab, so
  it is shown pixel for pixel there instead of being shrunk.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch.engine.text import display_name

LOG10_RANGE = (-8.0, 4.0)
"""The colour scale, in log10 of the gradient norm: 1e-8 (vanished) to 1e4 (exploded)."""

WIDTH_PX = 350
"""Width of the image: TensorBoard's IMAGES tab draws every image 350 pixels wide."""

# viridis (perceptually uniform) at nine anchors, interpolated linearly; special colours for
# NaN/Inf and zero.
_RAMP = np.array(
    [
        [68, 1, 84],
        [71, 45, 123],
        [59, 82, 139],
        [44, 114, 142],
        [33, 145, 140],
        [40, 174, 128],
        [94, 201, 98],
        [173, 220, 48],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
NONFINITE_COLOUR = (255, 0, 255)
ZERO_COLOUR = (200, 200, 200)
_LABEL_CHARS = 16  # longest layer label before it is shortened from the left


class GradientFlow:
    """A bounded layers x steps buffer of log10 gradient norms, and its picture.

    Steps enter one row of per-layer norms at a time; each column covers ``stride`` consecutive
    steps and holds the largest log10 norm among them (NaN if any was NaN/Inf, ``-inf`` if all were
    0). When ``max_columns`` columns are full, neighbouring columns are merged and the stride
    doubles, so the picture always spans the whole run in at most ``max_columns`` columns (the
    last one possibly covering fewer steps).

    Args:
        max_columns: Maximum number of columns kept (>= 2).
    """

    def __init__(self, max_columns: int = 128) -> None:
        self.max_columns = max_columns
        self.stride = 1
        self._columns: list[np.ndarray] = []
        self._pending: np.ndarray | None = None  # the column being filled
        self._pending_steps = 0
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
        for row in log10_cells(rows):
            self._pending = row if self._pending is None else np.maximum(self._pending, row)
            self._pending_steps += 1
            if self._pending_steps == self.stride:
                self._columns.append(self._pending)
                self._pending, self._pending_steps = None, 0
                if len(self._columns) >= self.max_columns:
                    self._halve()

    def _halve(self) -> None:
        """Merges neighbouring columns and doubles the stride (an odd last column is pending)."""
        columns = self._columns
        pairs = zip(columns[0::2], columns[1::2], strict=False)  # an odd last one: below
        self._columns = [np.maximum(a, b) for a, b in pairs]
        if len(columns) % 2:
            self._pending, self._pending_steps = columns[-1], self.stride
        self.stride *= 2

    def grid(self) -> np.ndarray:
        """``[L, C]`` log10 norms (NaN for NaN/Inf gradients, -inf for zero gradients)."""
        columns = self._columns + ([self._pending] if self._pending is not None else [])
        if not columns:
            return np.zeros((0, 0))
        return np.stack(columns, axis=1)

    def render(
        self,
        layer_names: list[str],
        plot: FlowPlot | None,
        log10_range: tuple[float, float] = LOG10_RANGE,
    ) -> np.ndarray | None:
        """The picture as ``[H, W, 3]`` uint8 (None before the first step).

        Args:
            layer_names: Row labels.
            plot: Draws a labelled plot; None draws a plain colour map.
            log10_range: The colour scale (log10 of the norm at the bottom and top colours).
        """
        grid = self.grid()
        if grid.size == 0 or grid.shape[0] != len(layer_names):
            return None
        rgb = colour_cells(grid, log10_range)
        if plot is not None:
            start = self.first_step or 0
            span = (start - 0.5 * self.stride, self.last_step + 0.5 * self.stride)
            return plot.draw(rgb, layer_names, span, log10_range)
        return _render_plain(rgb)


def log10_cells(norms: np.ndarray) -> np.ndarray:
    """log10 of norms as drawn: NaN for NaN/Inf, ``-inf`` for 0."""
    norms = np.asarray(norms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(norms)
    return np.where(np.isfinite(norms), logs, np.nan)


def colour_cells(grid: np.ndarray, log10_range: tuple[float, float] = LOG10_RANGE) -> np.ndarray:
    """``[L, C, 3]`` uint8 colours of a log10 grid on the fixed scale (NaN magenta, -inf grey).

    Example:
        >>> colour_cells(np.array([[np.nan, -np.inf, 100.0]]))[0].tolist()
        [[255, 0, 255], [200, 200, 200], [253, 231, 37]]
    """
    low, high = log10_range
    finite = np.isfinite(grid)
    position = np.clip((np.where(finite, grid, low) - low) / (high - low), 0.0, 1.0)
    scaled = position * (len(_RAMP) - 1)
    index = np.minimum(scaled.astype(np.int64), len(_RAMP) - 2)
    fraction = (scaled - index)[..., None]
    rgb = np.rint(_RAMP[index] * (1.0 - fraction) + _RAMP[index + 1] * fraction).astype(np.uint8)
    rgb[np.isnan(grid)] = NONFINITE_COLOUR
    rgb[np.isneginf(grid)] = ZERO_COLOUR
    return rgb


def _render_plain(rgb: np.ndarray) -> np.ndarray:
    """The colour cells without axes, scaled up to about :data:`WIDTH_PX` pixels wide."""
    rows, cols, _ = rgb.shape
    cell_height = int(np.clip(256 // max(rows, 1), 2, 16))
    cell_width = int(np.clip(WIDTH_PX // max(cols, 1), 1, 16))
    return np.repeat(np.repeat(rgb, cell_height, axis=0), cell_width, axis=1)


def short_labels(names: list[str], limit: int = _LABEL_CHARS) -> list[str]:
    """Layer names for a narrow axis: the dotted prefix the names share is dropped, and a name still
    too long keeps its start and its last part (``"11.attent…q_proj"``), which tell layers apart.

    Example:
        >>> short_labels(["model.layers.0.attn.q_proj", "model.layers.11.attention.q_proj", ""])
        ['0.attn.q_proj', '11.attent…q_proj', '<root>']
    """
    split = [name.split(".") for name in names if name]
    shared = 0
    if len(split) > 1:
        shortest = min(len(parts) for parts in split)
        while shared < shortest - 1 and len({parts[shared] for parts in split}) == 1:
            shared += 1
    labels = []
    for name in names:
        parts = name.split(".")
        label = ".".join(parts[shared:]) if name else display_name(name)
        if len(label) > limit:
            tail = parts[-1][-(limit // 2) :]
            label = label[: limit - len(tail) - 1] + "…" + tail
        labels.append(label)
    return labels


class FlowPlot:
    """A labelled heatmap drawn off-screen on matplotlib's Agg canvas (no pyplot state).

    matplotlib is imported when the plot is created, on the caller's thread: a first import on the
    writer thread while the interpreter shuts down (Ctrl-C right after the first flush) would make
    Python exit with status 1 instead of 130. The figure is built once per set of layers; only its
    data and extent change from one drawing to the next.

    Args:
        width: Width of the image in pixels (the height follows the number of layers).
    """

    def __init__(self, width: int = WIDTH_PX) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.width = width
        self._figure_class = Figure
        self._canvas_class = FigureCanvasAgg
        self._key: tuple[tuple[str, ...], tuple[float, float]] | None = None
        self._figure: Any = None
        self._image: Any = None

    def draw(
        self,
        rgb: np.ndarray,
        layer_names: list[str],
        span: tuple[float, float],
        log10_range: tuple[float, float] = LOG10_RANGE,
    ) -> np.ndarray:
        """Draws ``[L, C, 3]`` colour cells (rows: layers); returns ``[H, W, 3]`` uint8 pixels."""
        key = (tuple(layer_names), log10_range)
        if self._key != key:
            self._build(rgb, layer_names, log10_range)
            self._key = key
        self._image.set_data(rgb)
        self._image.set_extent((span[0], span[1], len(layer_names) - 0.5, -0.5))
        self._image.axes.set_xlim(span)
        self._figure.canvas.draw()
        pixels = np.asarray(self._figure.canvas.buffer_rgba())
        return np.ascontiguousarray(pixels[..., :3])

    def _build(
        self, rgb: np.ndarray, layer_names: list[str], log10_range: tuple[float, float]
    ) -> None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import LinearSegmentedColormap, Normalize
        from matplotlib.patches import Patch

        rows = len(layer_names)
        dpi = 100
        width_in = self.width / dpi
        scale = self.width / WIDTH_PX
        height_in = min(1.6 + 0.09 * rows, 9.0) * scale
        figure = self._figure_class(figsize=(width_in, height_in), dpi=dpi)
        self._canvas_class(figure)
        figure.set_layout_engine("constrained", h_pad=0.02, w_pad=0.02)
        font = 6.5 * scale
        axes = figure.add_subplot()
        image = axes.imshow(rgb, aspect="auto", interpolation="nearest")
        step = max(1, -(-rows // 24))  # at most about 24 labels
        ticks = list(range(0, rows, step))
        labels = short_labels(layer_names)
        axes.set_yticks(ticks, [labels[i] for i in ticks], fontsize=font)
        axes.spines[:].set_visible(False)  # a spine would hide the first and last columns
        axes.tick_params(axis="x", labelsize=font)
        axes.set_xlabel("step", fontsize=font, labelpad=1)
        axes.set_ylabel("layer (input at the top)", fontsize=font, labelpad=1)
        axes.set_title("gradient flow: log10 gradient norm", fontsize=font + 1, pad=3)
        colours = LinearSegmentedColormap.from_list("gradwatch", _RAMP / 255.0)  # as the cells
        mappable = ScalarMappable(Normalize(*log10_range), colours)
        bar = figure.colorbar(mappable, ax=axes, extend="both", fraction=0.06, pad=0.02)
        low, high = log10_range
        spacing = 2 if rows >= 8 else 4  # a short colour bar gets fewer labels
        bar.set_ticks(np.arange(math.ceil(low / spacing) * spacing, high + 1e-9, spacing).tolist())
        bar.ax.tick_params(labelsize=font)
        bar.set_label("log10 norm", fontsize=font, labelpad=1)
        legend = [
            Patch(color=_unit_rgb(NONFINITE_COLOUR), label="NaN/Inf"),
            Patch(color=_unit_rgb(ZERO_COLOUR), label="no gradient (0)"),
        ]
        figure.legend(
            handles=legend,
            loc="outside lower center",
            ncols=2,
            fontsize=font,
            frameon=False,
            handlelength=1.0,
            borderaxespad=0.1,
        )
        self._figure, self._image = figure, image


def _unit_rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    red, green, blue = colour
    return red / 255, green / 255, blue / 255


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
