"""The TensorBoard sink: every flush record as batched TensorBoard events, off the training thread.

What is written (tags as in the public contract):

- ``gradwatch/grad_norm_total`` every step, ``gradwatch/clip_coef`` and ``gradwatch/lr_scale`` every
  step when a remedy produces them;
- ``gradwatch/grad_norm/<layer>``, ``gradwatch/weight_norm/<layer>`` and, with ``track_updates``,
  ``gradwatch/update_ratio/<layer>`` at the last step of each flush;
- ``gradwatch/alerts/<kind>`` (alerts so far) when it changes, and ``gradwatch/alerts`` (text: the
  message and advice of each alert, at its step);
- ``gradwatch/grad_hist/<layer>`` histograms (binned on the device by
  :class:`~gradwatch.histograms.GradientHistograms`);
- ``gradwatch/gradient_flow``: an image, layers (rows, forward order) x steps (columns), coloured by
  log10 gradient norm, at every flush;
- a custom-scalars layout, once per run, with all layers of a family in one multiline chart.

The root layer ``""`` is written as ``<root>``. With a ``torch.utils.tensorboard.SummaryWriter``,
every step's values go into one ``Summary`` proto (one event per step instead of one per value);
any other writer-like object gets the equivalent ``add_*`` calls.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import queue
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch.alerts import Alert
from gradwatch.record import FlushRecord
from gradwatch.sinks.base import Sink

PREFIX = "gradwatch"
TOTAL_TAG = f"{PREFIX}/grad_norm_total"
CLIP_TAG = f"{PREFIX}/clip_coef"
LR_SCALE_TAG = f"{PREFIX}/lr_scale"
ALERTS_TAG = f"{PREFIX}/alerts"
FLOW_TAG = f"{PREFIX}/gradient_flow"
ROOT_NAME = "<root>"
MIN_COLOUR_DECADES = 4.0  # the gradient-flow colour scale spans at least this many decades
CUSTOM_SCALARS_CATEGORY = "gradwatch"

_STOP = object()
_WRITER_QUEUE = 1024  # events SummaryWriter buffers: a flush's events never wait for the disk
_WRITER_FLUSH_S = 10  # seconds between file flushes (what a live dashboard lags at most)
_PUT_TIMEOUT_S = 60.0
_CLOSE_TIMEOUT_S = 120.0


def layer_tag(family: str, layer: str) -> str:
    """The tag of one layer's series, e.g. ``gradwatch/grad_norm/encoder.0`` (root: ``<root>``)."""
    return f"{PREFIX}/{family}/{layer or ROOT_NAME}"


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: one multiline chart per family (tags are regular expressions)."""
    return {
        CUSTOM_SCALARS_CATEGORY: {
            "gradient norm per layer": ["Multiline", [f"^{PREFIX}/grad_norm/"]],
            "weight norm per layer": ["Multiline", [f"^{PREFIX}/weight_norm/"]],
            "update/weight ratio per layer": ["Multiline", [f"^{PREFIX}/update_ratio/"]],
            "total gradient norm, clip coefficient, LR scale": [
                "Multiline",
                [f"^{TOTAL_TAG}$", f"^{CLIP_TAG}$", f"^{LR_SCALE_TAG}$"],
            ],
        }
    }


def format_alert_markdown(alert: Alert) -> str:
    """The ``gradwatch/alerts`` text of an alert (Markdown; ``gradwatch report`` parses it back)."""
    header = f"**{alert.kind.value}** ({alert.severity}) at step {alert.step}"
    if alert.layers:
        header += ", layers: " + ", ".join(f"`{name or ROOT_NAME}`" for name in alert.layers)
    text = f"{header}\n\n{alert.message}"
    if alert.advice:
        text += "\n\nAdvice:\n" + "\n".join(f"- {item}" for item in alert.advice)
    return text


class TensorBoardSink(Sink):
    """Writes flush records to TensorBoard.

    By default a single background thread does the writing (building protos, rendering the
    gradient-flow image, encoding, file I/O); :meth:`write` only enqueues the record (a bounded
    queue). :meth:`close` drains the queue and flushes the writer. A failure of the writer (disk
    full, permission denied...) stops the sink: the next :meth:`write` (or :meth:`close`) raises
    once, so the watch disables the sink with a single warning while training goes on.

    Example:
        >>> sink = TensorBoardSink(logdir="runs/exp1")  # doctest: +SKIP
        >>> watch = GradWatch(model, sinks=[sink])  # doctest: +SKIP

    Args:
        logdir: Run directory; a ``SummaryWriter`` is created (and closed) by the sink. A directory
            that cannot be created gives one warning and a disabled sink.
        writer: An existing ``SummaryWriter`` or any object with its ``add_*`` methods (flushed,
            not closed, by :meth:`close`).
        background: Write on a background thread (True) or on the caller's thread.
        flow_columns: Maximum columns of the gradient-flow image; older steps are merged pairwise
            so the image always spans the whole run.
        use_matplotlib: Labelled gradient-flow plot with matplotlib (None: when importable), or a
            plain colour map (False).
        image_interval: Minimum seconds between two gradient-flow images (drawing one takes tens
            of milliseconds); the last flush before :meth:`close` always gets one.
        queue_size: Records the background queue holds before :meth:`write` waits.

    Raises:
        ValueError: Neither or both of ``logdir`` and ``writer`` given, or a bad size.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        *,
        background: bool = True,
        flow_columns: int = 256,
        use_matplotlib: bool | None = None,
        image_interval: float = 5.0,
        queue_size: int = 16,
    ) -> None:
        if (logdir is None) == (writer is None):
            raise ValueError("TensorBoardSink needs exactly one of logdir or writer")
        if flow_columns < 2:
            raise ValueError(f"flow_columns must be >= 2, got {flow_columns}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if not image_interval >= 0:
            raise ValueError(f"image_interval must be >= 0 seconds, got {image_interval}")
        self._owns_writer = writer is None
        self._writer: Any = writer
        self._error: BaseException | None = None
        self._failure_reported = False
        self._closed = False
        self._flow = GradientFlow(flow_columns)
        matplotlib_wanted = _matplotlib_available() if use_matplotlib is None else use_matplotlib
        self._plot = _FlowPlot() if matplotlib_wanted else None
        self._image_interval = image_interval
        self._image_due_step: int | None = None  # the newest step not yet in an image
        self._last_image_time = -math.inf
        self._layout_written = False
        self._alert_counts: dict[str, int] = {}
        self._flow_names: list[str] = []
        self._tags: dict[tuple[str, ...], dict[str, list[str]]] = {}
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(
                    log_dir=os.fspath(logdir),  # type: ignore[arg-type]
                    max_queue=_WRITER_QUEUE,
                    flush_secs=_WRITER_FLUSH_S,
                )
            except Exception as error:  # the training loop comes first
                self._error = error
                self._failure_reported = True
                warnings.warn(
                    f"gradwatch: cannot write TensorBoard logs to {os.fspath(logdir)!r} "  # type: ignore[arg-type]
                    f"({error!r}); TensorBoard logging is disabled, training continues",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        if background and self._error is None:
            self._queue = queue.Queue(maxsize=queue_size)
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name="gradwatch-tensorboard", daemon=True
            )
            self._thread.start()
            atexit.register(self._close_at_exit)

    def write(self, record: FlushRecord) -> None:
        """Writes (or enqueues) one flush record.

        Raises:
            RuntimeError: Once, when an earlier write failed; the sink is disabled from then on.
        """
        self._raise_if_failed()
        if self._error is not None or self._closed:
            return
        if self._queue is None:
            self._write_guarded(record)
            self._write_image_guarded(final=False)
            self._raise_if_failed()
            return
        try:
            self._queue.put(record, timeout=_PUT_TIMEOUT_S)
        except queue.Full:
            self._error = RuntimeError(
                f"the TensorBoard writer fell behind (queue full for {_PUT_TIMEOUT_S:.0f} s)"
            )
            self._raise_if_failed()

    def flush(self) -> None:
        """Waits until every enqueued record is written, then flushes the writer."""
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._queue.join()
        if self._error is None:
            _call_if_present(self._writer, "flush")

    def close(self) -> None:
        """Drains the queue, flushes the writer and closes it if the sink created it.

        Raises:
            RuntimeError: When writing failed and the failure was not reported yet.
        """
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop_worker()
        else:
            self._write_image_guarded(final=True)
        if self._error is None:
            try:
                _call_if_present(self._writer, "close" if self._owns_writer else "flush")
            except Exception as error:
                self._error = error
        self._raise_if_failed()

    # ------------------------------------------------------------------ the writing thread

    def _stop_worker(self) -> None:
        """Lets the worker write what is queued (or discard it after a failure) and end."""
        thread, records = self._thread, self._queue
        if thread is None or records is None:
            return
        self._thread = None
        atexit.unregister(self._close_at_exit)
        records.put(_STOP)
        thread.join(timeout=_CLOSE_TIMEOUT_S)
        if thread.is_alive() and self._error is None:
            self._error = RuntimeError(
                f"the TensorBoard writer did not finish within {_CLOSE_TIMEOUT_S:.0f} s"
            )

    def _run(self, records: queue.Queue[Any]) -> None:
        """Writes what is queued; one gradient-flow image per batch of queued records at most."""
        stop = False
        while not stop:
            batch = [records.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(records.get_nowait())
            try:
                for item in batch:
                    if item is _STOP:
                        stop = True
                    else:
                        self._write_guarded(item)
                self._write_image_guarded(final=stop)
            finally:
                for _ in batch:
                    records.task_done()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as error:
            warnings.warn(
                f"gradwatch: TensorBoard sink failed: {error!r}", RuntimeWarning, stacklevel=2
            )

    def _write_guarded(self, record: FlushRecord) -> None:
        if self._error is not None:
            return
        try:
            self._write_record(record)
        except Exception as error:  # disk full, permission denied, a broken writer...
            self._error = error

    def _write_image_guarded(self, *, final: bool) -> None:
        """Writes the gradient-flow image if new steps arrived and it is due (or ``final``)."""
        step = self._image_due_step
        if self._error is not None or step is None:
            return
        if not final and time.monotonic() - self._last_image_time < self._image_interval:
            return
        try:
            image = self._flow.render(self._flow_names, self._plot)
            if image is not None:
                _write_events(self._writer, {step: [_Entry("image", FLOW_TAG, image)]})
            self._image_due_step = None
            self._last_image_time = time.monotonic()
        except Exception as error:
            self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None and not self._failure_reported:
            self._failure_reported = True
            self._stop_worker()
            if self._owns_writer:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    _call_if_present(self._writer, "close")
            raise RuntimeError(f"TensorBoard writing failed: {self._error!r}") from self._error

    # ------------------------------------------------------------------ building the events

    def _write_record(self, record: FlushRecord) -> None:
        if not self._layout_written:
            self._write_layout()
            self._layout_written = True
        _write_events(self._writer, self._events(record))
        if len(record.steps):
            self._flow.add(record.steps, record.grad_norms)
            self._flow_names = record.layer_names
            self._image_due_step = int(record.steps[-1])

    def _write_layout(self) -> None:
        file_writer = _file_writer_of(self._writer)
        if file_writer is not None:
            from torch.utils.tensorboard.summary import custom_scalars

            file_writer.add_summary(custom_scalars(custom_scalars_layout()))
        else:
            _call_if_present(self._writer, "add_custom_scalars", custom_scalars_layout())

    def _layer_tags(self, names: list[str]) -> dict[str, list[str]]:
        key = tuple(names)
        tags = self._tags.get(key)
        if tags is None:
            families = ("grad_norm", "weight_norm", "update_ratio", "grad_hist")
            tags = {family: [layer_tag(family, name) for name in names] for family in families}
            self._tags = {key: tags}
        return tags

    def _events(self, record: FlushRecord) -> dict[int, list[_Entry]]:
        """Everything one record writes, grouped by step (steps in increasing order)."""
        events: dict[int, list[_Entry]] = {}
        steps = [int(step) for step in record.steps]
        per_step = [(TOTAL_TAG, record.total_norms)]
        if record.clip_coefs is not None:
            per_step.append((CLIP_TAG, record.clip_coefs))
        if record.lr_scales is not None:
            per_step.append((LR_SCALE_TAG, record.lr_scales))
        columns = [(tag, np.asarray(values, dtype=np.float64).tolist()) for tag, values in per_step]
        for index, step in enumerate(steps):
            events[step] = [_Entry("scalar", tag, values[index]) for tag, values in columns]
        if not steps:
            return events
        last = steps[-1]
        tags = self._layer_tags(record.layer_names)
        final = events[last]
        layer_rows = [("grad_norm", record.grad_norms[-1]), ("weight_norm", record.weight_norms)]
        if record.update_ratios is not None:
            layer_rows.append(("update_ratio", record.update_ratios))
        for family, values in layer_rows:
            row = np.asarray(values, dtype=np.float64).tolist()
            final.extend(
                _Entry("scalar", tag, value) for tag, value in zip(tags[family], row, strict=True)
            )
        for kind, count in sorted(record.alert_counts.items()):
            if self._alert_counts.get(kind) != count:
                self._alert_counts[kind] = count
                final.append(_Entry("scalar", f"{ALERTS_TAG}/{kind}", float(count)))
        for alert in sorted(record.new_alerts, key=lambda a: a.step):
            text = format_alert_markdown(alert)
            events.setdefault(alert.step, []).append(_Entry("text", ALERTS_TAG, text))
        hist_tags = dict(zip(record.layer_names, tags["grad_hist"], strict=True))
        for step, name, histogram in record.histograms:
            tag = hist_tags.get(name, layer_tag("grad_hist", name))
            events.setdefault(int(step), []).append(_Entry("histogram", tag, histogram))
        return dict(sorted(events.items()))


@dataclass
class _Entry:
    """One value to write: ``kind`` is ``scalar``, ``text``, ``histogram`` or ``image``."""

    kind: str
    tag: str
    value: Any


def _write_events(writer: Any, events: dict[int, list[_Entry]]) -> None:
    file_writer = _file_writer_of(writer)  # fetched each time: SummaryWriter reopens it if closed
    if file_writer is not None:
        _write_protos(file_writer, events)
    else:
        _write_calls(writer, events)


def _write_protos(file_writer: Any, events: dict[int, list[_Entry]]) -> None:
    """One ``Summary`` proto (one event) per step, holding every value of that step."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

    for step, entries in events.items():
        summary = Summary()
        for entry in entries:
            if entry.kind == "scalar":
                summary.value.add(tag=entry.tag, simple_value=entry.value)
            elif entry.kind == "text":
                metadata = SummaryMetadata(
                    plugin_data=SummaryMetadata.PluginData(
                        plugin_name="text", content=TextPluginData(version=0).SerializeToString()
                    )
                )
                tensor = TensorProto(
                    dtype="DT_STRING",
                    string_val=[entry.value.encode("utf-8")],
                    tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
                )
                summary.value.add(tag=entry.tag, metadata=metadata, tensor=tensor)
            elif entry.kind == "histogram":
                hist = entry.value
                proto = HistogramProto(
                    min=hist["min"],
                    max=hist["max"],
                    num=hist["num"],
                    sum=hist["sum"],
                    sum_squares=hist["sum_squares"],
                    bucket_limit=hist["bucket_limits"],
                    bucket=hist["bucket_counts"],
                )
                summary.value.add(tag=entry.tag, histo=proto)
            else:
                height, width, _ = entry.value.shape
                image = Summary.Image(
                    height=height,
                    width=width,
                    colorspace=3,
                    encoded_image_string=encode_png(entry.value),
                )
                summary.value.add(tag=entry.tag, image=image)
        file_writer.add_summary(summary, step)


def _write_calls(writer: Any, events: dict[int, list[_Entry]]) -> None:
    """The same events through the writer's public ``add_*`` methods (any writer-like object)."""
    for step, entries in events.items():
        for entry in entries:
            if entry.kind == "scalar":
                writer.add_scalar(entry.tag, entry.value, step)
            elif entry.kind == "text":
                _call_if_present(writer, "add_text", entry.tag, entry.value, step)
            elif entry.kind == "histogram":
                _call_if_present(
                    writer, "add_histogram_raw", entry.tag, global_step=step, **entry.value
                )
            else:
                _call_if_present(
                    writer, "add_image", entry.tag, entry.value, step, dataformats="HWC"
                )


def _file_writer_of(writer: Any) -> Any:
    """The ``FileWriter`` of a ``torch.utils.tensorboard.SummaryWriter``, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return None
    if isinstance(writer, SummaryWriter):
        return writer._get_file_writer()
    return None


def _call_if_present(obj: Any, method: str, *args: Any, **kwargs: Any) -> None:
    function = getattr(obj, method, None)
    if callable(function):
        function(*args, **kwargs)


# ---------------------------------------------------------------------- the gradient-flow image


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

    def render(self, layer_names: list[str], plot: _FlowPlot | None) -> np.ndarray | None:
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


class _FlowPlot:
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
        axes.set_yticks(ticks, [layer_names[i] or ROOT_NAME for i in ticks], fontsize=7)
        axes.set_xlabel("step")
        axes.set_ylabel("layer (forward order)")
        axes.set_title("gradient flow: log10 gradient norm per layer (magenta: NaN/Inf)")
        figure.colorbar(image, ax=axes, label="log10 gradient norm")
        figure.tight_layout()
        self._figure, self._image, self._layer_names = figure, image, list(layer_names)


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def encode_png(rgb: np.ndarray) -> bytes:
    """Encodes ``[H, W, 3]`` uint8 pixels as PNG (zlib only, no imaging library needed)."""
    height, width, _ = rgb.shape
    rows = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(height, width * 3)
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (
            struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(raw, 6)),
            chunk(b"IEND", b""),
        ]
    )
