"""The TensorBoard sink: every flush record as batched TensorBoard events, off the training thread.

What is written (tags in :mod:`gradwatch.sinks.schema`):

- every step: ``gradwatch/grad_norm_total``, the log10 gradient norm of the first, middle and last
  third of the layers and of all layers (``gradwatch/depth/...``), and ``gradwatch/clip_coef`` and
  ``gradwatch/lr_scale`` when a remedy produces them;
- at the last step of each flush, per layer: the gradient norm (``gradwatch/grad_norm/<layer>``),
  its largest, smallest and median value over the steps of the flush (``grad_norm_max``,
  ``grad_norm_min``, ``grad_norm_median``), the number of NaN/Inf steps when there were any, the
  weight norm and, with ``track_updates``, the update/weight ratio;
- ``gradwatch/alerts/<kind>`` (alerts so far) at the step of each alert, ``gradwatch/alerts`` (text:
  the message and advice of each alert, at its step) and ``gradwatch/alert_log`` (every alert so
  far, oldest first);
- ``gradwatch/grad_hist/<layer>`` histograms (binned on the device by
  :class:`~gradwatch.engine.histograms.GradientHistograms`);
- ``gradwatch/gradient_flow``: the image of :mod:`gradwatch.sinks.flow` (fixed colour scale);
- a custom-scalars layout, once per run: an overview (depth bands, alerts, remedies) open, the
  per-layer charts (one per family) collapsed.

With a ``torch.utils.tensorboard.SummaryWriter``, every step's values go into one ``Summary`` proto
(one event per step instead of one per value); any other writer-like object gets the equivalent
``add_*`` calls (:mod:`gradwatch.sinks.events`).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import time
import warnings
from typing import Any

from gradwatch.engine.alerts import Alert
from gradwatch.engine.records import FlushRecord
from gradwatch.sinks.background import BackgroundWriter, approximate_nbytes
from gradwatch.sinks.base import Sink
from gradwatch.sinks.events import Entry, call_if_present, write_events, write_layout
from gradwatch.sinks.flow import LOG10_RANGE, FlowPlot, GradientFlow, matplotlib_available
from gradwatch.sinks.schema import (
    ALERT_LOG_TAG,
    ALERTS_TAG,
    FLOW_TAG,
    GRAD_HIST_FAMILY,
    ScalarTags,
    custom_scalars_layout,
    format_alert_log,
    format_alert_markdown,
    layer_tag,
)

_WRITER_QUEUE = 1024  # events SummaryWriter buffers: a flush's events never wait for the disk
_WRITER_FLUSH_S = 10  # seconds between file flushes (what a live dashboard lags at most)


IMAGE_BUDGET = 400.0
"""The gradient-flow image takes at most 1/400 of one core: after a drawing that took ``t`` seconds
of CPU, the next waits at least ``IMAGE_BUDGET * t`` seconds (a 75 ms matplotlib drawing, as on a
2-core VM: 30 s, TensorBoard's reload period), so the writer thread barely competes with
training on a small machine."""


class TensorBoardSink(Sink):
    """Writes flush records to TensorBoard.

    By default a single background thread does the writing (building protos, rendering the
    gradient-flow image, encoding, file I/O); :meth:`write` only hands the record over and never
    waits (:class:`~gradwatch.sinks.background.BackgroundWriter`). A writer that falls behind by
    more than ``backlog_bytes`` of records loses the oldest waiting ones (one warning; the count is
    :attr:`dropped`); :meth:`close` writes what is waiting and flushes (or closes) the writer, and
    waits at most ``close_timeout`` seconds for a writer that hangs. A failure of the writer (disk
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
            (largest norm, NaN/Inf kept) so the image always spans the whole run. At most the
            width of the plot (about 180 pixels) so that no column is dropped when drawn.
        flow_range: The image's fixed colour scale: log10 of the norms drawn in the bottom and top
            colours (the same for every run, so runs can be compared).
        use_matplotlib: Labelled gradient-flow plot with matplotlib (None: when importable), or a
            plain colour map (False).
        image_interval: Minimum seconds between two gradient-flow images, and before the first
            (TensorBoard's page reloads every 30 s). Drawing one takes tens of milliseconds of a
            core, so the gap also grows to at least :data:`IMAGE_BUDGET` times the last drawing's
            CPU time (0: an image at every flush); the last flush before :meth:`close` always
            gets one.
        backlog_bytes: Memory the records waiting for the background writer may hold; beyond it
            the oldest waiting records are dropped (the newest is always kept).
        close_timeout: Seconds :meth:`close` waits for the background writer to finish.

    Attributes:
        dropped: Records dropped because the background writer was behind.

    Raises:
        ValueError: Neither or both of ``logdir`` and ``writer`` given, or a bad size.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        *,
        background: bool = True,
        flow_columns: int = 128,
        flow_range: tuple[float, float] = LOG10_RANGE,
        use_matplotlib: bool | None = None,
        image_interval: float = 30.0,
        backlog_bytes: int = 64 * 2**20,
        close_timeout: float = 10.0,
    ) -> None:
        if (logdir is None) == (writer is None):
            raise ValueError("TensorBoardSink needs exactly one of logdir or writer")
        if flow_columns < 2:
            raise ValueError(f"flow_columns must be >= 2, got {flow_columns}")
        if not (
            isinstance(flow_range, tuple)
            and len(flow_range) == 2
            and all(isinstance(v, int | float) and math.isfinite(v) for v in flow_range)
            and flow_range[0] < flow_range[1]
        ):
            raise ValueError(
                f"flow_range must be (low, high) log10 norms with low < high, got {flow_range!r}"
            )
        if not image_interval >= 0:
            raise ValueError(f"image_interval must be >= 0 seconds, got {image_interval}")
        if backlog_bytes < 0:
            raise ValueError(f"backlog_bytes must be >= 0, got {backlog_bytes}")
        if not 0 <= close_timeout < math.inf:
            raise ValueError(f"close_timeout must be >= 0 seconds, got {close_timeout}")
        self._owns_writer = writer is None
        self._writer: Any = writer
        self._error: BaseException | None = None
        self._failure_reported = False
        self._closed = False
        self._close_timeout = close_timeout
        self._flow = GradientFlow(flow_columns)
        self._flow_range = (float(flow_range[0]), float(flow_range[1]))
        matplotlib_wanted = matplotlib_available() if use_matplotlib is None else use_matplotlib
        self._plot = FlowPlot() if matplotlib_wanted else None  # imports matplotlib here
        self._image_interval = image_interval
        self._image_due_step: int | None = None  # the newest step not yet in an image
        # The first image comes one interval after the start (or at close): a short run draws once.
        self._last_image_time = time.monotonic()
        self._image_gap = image_interval  # seconds to wait after the last image (and the budget)
        self._layout_written = False
        self._scalars = ScalarTags()
        self._alerts: list[Alert] = []
        self._flow_names: list[str] = []
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
        self._background: BackgroundWriter | None = None
        self._worker_stopped = False
        if background and self._error is None:
            self._background = BackgroundWriter(
                self._write_batch, name="gradwatch-tensorboard", max_bytes=backlog_bytes
            )
            atexit.register(self._close_at_exit)

    @property
    def dropped(self) -> int:
        """Records dropped so far because the background writer was behind."""
        return self._background.dropped if self._background is not None else 0

    def write(self, record: FlushRecord) -> None:
        """Writes (or hands to the background writer) one flush record; never waits for it.

        Raises:
            RuntimeError: Once, when an earlier write failed; the sink is disabled from then on.
        """
        self._raise_if_failed()
        if self._error is not None or self._closed:
            return
        background = self._background
        if background is None:
            self._write_batch([record], final=False)
            self._raise_if_failed()
            return
        dropped = background.dropped
        background.submit(record, approximate_nbytes(record))
        if background.dropped and not dropped:
            warnings.warn(
                "gradwatch: the TensorBoard writer is behind; the oldest records waiting for it "
                "are dropped (TensorBoardSink.dropped counts them) and training continues",
                RuntimeWarning,
                stacklevel=4,
            )

    def flush(self) -> None:
        """Waits (at most ``close_timeout`` s) until every record handed over is written, then
        flushes the writer."""
        background = self._background
        if (
            background is not None
            and not self._worker_stopped
            and not background.wait_idle(self._close_timeout)
        ):
            return
        if self._error is None:
            call_if_present(self._writer, "flush")

    def close(self) -> None:
        """Writes what is waiting, flushes the writer and closes it if the sink created it.

        Waits at most ``close_timeout`` seconds for the background writer.

        Raises:
            RuntimeError: When writing failed (or timed out) and was not reported yet.
        """
        if self._closed:
            return
        self._closed = True
        if self._background is not None:
            self._stop_worker()
        else:
            self._write_batch([], final=True)
        self._raise_if_failed()

    # ------------------------------------------------------------------ the writing thread

    def _stop_worker(self) -> None:
        """Lets the worker write what is waiting (or discard it after a failure) and end."""
        background = self._background
        if background is None or self._worker_stopped:
            return
        self._worker_stopped = True
        atexit.unregister(self._close_at_exit)
        if not background.close(self._close_timeout) and self._error is None:
            self._error = RuntimeError(
                f"the TensorBoard writer did not finish within {self._close_timeout:g} s "
                f"({background.waiting} record(s) not written)"
            )

    def _write_batch(self, records: list[FlushRecord], final: bool) -> None:
        """Writes records, then the gradient-flow image if due; ``final``: closes the writer."""
        for record in records:
            self._write_guarded(record)
        self._write_image_guarded(final=final)
        if final:
            try:
                call_if_present(self._writer, "close" if self._owns_writer else "flush")
            except Exception as error:
                if self._error is None:
                    self._error = error

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
        if not final and time.monotonic() - self._last_image_time < self._image_gap:
            return
        try:
            started = time.thread_time()
            image = self._flow.render(self._flow_names, self._plot, self._flow_range)
            if image is not None:
                write_events(self._writer, {step: [Entry("image", FLOW_TAG, image)]})
            self._image_due_step = None
            self._last_image_time = time.monotonic()
            spent = time.thread_time() - started
            if self._image_interval > 0:  # 0: an image at every flush, whatever it costs
                self._image_gap = max(self._image_interval, IMAGE_BUDGET * spent)
        except Exception as error:
            self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None and not self._failure_reported:
            self._failure_reported = True
            if self._background is not None:
                self._stop_worker()  # the worker closes the writer (a hung one: after the wait)
            elif self._owns_writer:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    call_if_present(self._writer, "close")
            raise RuntimeError(f"TensorBoard writing failed: {self._error!r}") from self._error

    # ------------------------------------------------------------------ building the events

    def _write_record(self, record: FlushRecord) -> None:
        if not self._layout_written:
            remedies = record.clip_coefs is not None or record.lr_scales is not None
            write_layout(self._writer, custom_scalars_layout(remedies=remedies))
            self._layout_written = True
        write_events(self._writer, self._events(record))
        if len(record.steps):
            self._flow.add(record.steps, record.grad_norms)
            self._flow_names = record.layer_names
            self._image_due_step = int(record.steps[-1])

    def _events(self, record: FlushRecord) -> dict[int, list[Entry]]:
        """Everything one record writes, grouped by step (steps in increasing order)."""
        events = {
            step: [Entry("scalar", tag, value) for tag, value in values.items()]
            for step, values in self._scalars.scalars(record).items()
        }
        new_alerts = sorted(record.new_alerts, key=lambda alert: alert.step)
        for alert in new_alerts:
            text = format_alert_markdown(alert)
            events.setdefault(alert.step, []).append(Entry("text", ALERTS_TAG, text))
        if new_alerts:
            self._alerts += new_alerts
            log = format_alert_log(self._alerts)
            events.setdefault(record.last_step, []).append(Entry("text", ALERT_LOG_TAG, log))
        hist_tags = dict(
            zip(
                record.layer_names,
                self._scalars.layer_tags(record.layer_names)[GRAD_HIST_FAMILY],
                strict=True,
            )
        )
        for step, name, histogram in record.histograms:
            tag = hist_tags.get(name, layer_tag(GRAD_HIST_FAMILY, name))
            events.setdefault(int(step), []).append(Entry("histogram", tag, histogram))
        return dict(sorted(events.items()))
