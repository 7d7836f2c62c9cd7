"""``GradWatch``: the plain-PyTorch frontend.

A thin layer over :class:`~gradwatch.engine.engine.Engine`: it validates the objects of the training
loop, drives the engine once per optimizer step (by hand or through :meth:`GradWatch.attach`),
hands every flush record to its sinks, dispatches new alerts (the ``gradwatch`` logger, then
``on_alert``) and applies the error policy: bad configuration raises at construction, anything
that goes wrong later is one warning and training goes on.
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch.engine import distributed
from gradwatch.engine.alerts import Alert, logger
from gradwatch.engine.config import WatchConfig
from gradwatch.engine.detectors import Detector
from gradwatch.engine.engine import Engine
from gradwatch.engine.layers import NamePatterns
from gradwatch.engine.observation import StepReport
from gradwatch.engine.optimizer import check_step_hooks
from gradwatch.engine.records import FlushRecord
from gradwatch.engine.remedies import Remedy
from gradwatch.engine.warn import WarnOnce
from gradwatch.sinks.base import Sink


class GradWatch:
    """Watches per-layer gradient norms of ``model`` at every optimizer step.

    Call :meth:`step` after ``loss.backward()`` (and ``scaler.unscale_``) and before
    ``optimizer.step()``, or :meth:`attach` to run it automatically before each optimizer step.
    Nothing leaves the device between flushes; every ``log_every_n_steps`` steps one packed tensor
    is copied to the host, alerts materialise and sinks are written. A new warning or error does not
    wait: it is delivered at most two steps after the step it describes (an early flush, one host
    sync, only then).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with GradWatch(model, log_every_n_steps=10) as watch:
        ...     model(torch.randn(16, 4)).pow(2).mean().backward()
        ...     report = watch.step()
        >>> watch.layer_names
        ['0', '2']

    Args:
        model: The module to watch (``DistributedDataParallel`` and ``torch.compile`` wrappers are
            looked through).
        optimizer: Its optimizer; required by :meth:`attach` and by remedies that act on it
            (wrappers such as Accelerate's ``AcceleratedOptimizer`` are looked through).
        logdir: TensorBoard run directory (created; rank 0 only).
        writer: An existing ``SummaryWriter`` (or an object with its ``add_*`` methods) instead.
        log_every_n_steps: Flush cadence (host transfer, alerts, per-layer scalars); >= 1.
        histogram_every_n_steps: Gradient histogram cadence; 0 disables histograms.
        detectors: ``"default"`` (vanishing, exploding by update size and by gradient profile,
            spike, non-finite, zero gradient), a sequence of detector objects, or ``()`` for none.
        remedies: Remedy objects, applied in order.
        scaler: The ``torch.amp.GradScaler``, so AMP overflow steps are recognised.
        check_activations: Forward hooks for saturation, dead units and the first non-finite output.
        track_updates: Measure the per-layer update/weight ratio on flush steps.
        on_alert: Called with each new alert, on the host (warnings and errors at most two steps
            after the step they describe).
        nonfinite: ``"warn"`` (alert) or ``"raise"`` (:class:`GradientError` from :meth:`step`;
            reads one flag per step).
        window: Steps of history kept (at least ``log_every_n_steps``).
        include: Watch only the layers whose name matches: a glob string (``"encoder.*"``), a
            compiled ``re.Pattern`` (searched in the name), or a sequence of them.
        exclude: Leave out the layers whose name matches (same patterns as ``include``).
        probe_every_n_steps: Measure the gradients at every N-th step only (for the largest
            models); the steps in between cost almost nothing. Not with remedies or
            ``nonfinite="raise"``, which act on every step.
        fused: Where clipping and skipping act: inside a fused optimizer's kernel when exact (None),
            always (True; raises if the optimizer does not allow it) or never (False).
        sinks: Extra sinks (e.g. a framework logger adapter), written at every flush on rank 0.
        params: Watch only these parameters of ``model`` (e.g. one optimizer's); default every
            trainable parameter.
        config: A :class:`~gradwatch.engine.config.WatchConfig` instead of the options above (what
            framework integrations pass); the options must then be left at their defaults.

    Raises:
        TypeError: An argument of the wrong kind (the message names it and the value).
        ValueError: An argument out of range, or a model without trainable parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        logdir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        log_every_n_steps: int = 50,
        histogram_every_n_steps: int = 0,
        detectors: str | Sequence[Detector] = "default",
        remedies: Sequence[Remedy] = (),
        scaler: Any = None,
        check_activations: bool = False,
        track_updates: bool = False,
        on_alert: Callable[[Alert], None] | None = None,
        nonfinite: str = "warn",
        window: int = 1000,
        include: NamePatterns = None,
        exclude: NamePatterns = None,
        probe_every_n_steps: int = 1,
        fused: bool | None = None,
        sinks: Sequence[Sink] = (),
        params: Iterable[nn.Parameter] | None = None,
        config: WatchConfig | None = None,
    ) -> None:
        options: dict[str, Any] = {
            "log_every_n_steps": log_every_n_steps,
            "histogram_every_n_steps": histogram_every_n_steps,
            "detectors": detectors,
            "remedies": remedies,
            "check_activations": check_activations,
            "track_updates": track_updates,
            "on_alert": on_alert,
            "nonfinite": nonfinite,
            "window": window,
            "include": include,
            "exclude": exclude,
            "probe_every_n_steps": probe_every_n_steps,
            "fused": fused,
        }
        if config is None:
            config = WatchConfig(**options)
        elif not isinstance(config, WatchConfig):
            raise TypeError(f"config must be a gradwatch WatchConfig, got {config!r}")
        elif options != _DEFAULT_OPTIONS:
            changed = sorted(k for k, v in options.items() if v != _DEFAULT_OPTIONS[k])
            raise ValueError(f"pass either config= or the options {changed}, not both")
        _check_frontend_arguments(model, optimizer, logdir, writer, scaler, sinks, params)
        params = _checked_params(params)
        self.config = config
        # The engine never calls on_alert (the watch does); without it in the engine's config, a
        # callback referring to the watch cannot keep the watch alive through ``_release``.
        engine_config = config.replace(on_alert=None) if config.on_alert is not None else config
        self.engine = Engine(model, optimizer, engine_config, scaler=scaler, params=params)
        self._sinks: list[Sink] = list(sinks) if distributed.is_rank_zero() else []
        if distributed.is_rank_zero() and (logdir is not None or writer is not None):
            from gradwatch.sinks.tensorboard import TensorBoardSink

            self._sinks.append(TensorBoardSink(logdir=logdir, writer=writer))
        self._attached = False
        self._warn_once = WarnOnce()
        self._closed = False
        # Steps, flushes and reads from other threads take turns (reads see whole flushes).
        self._lock = threading.RLock()
        # Closed at interpreter exit if nobody called close(); released exactly once, by close()
        # or when the watch is garbage-collected without it (pending steps flushed to the sinks,
        # every hook removed, learning rates restored, writer threads ended).
        self._exit_hook = _ExitHook(self)
        atexit.register(self._exit_hook)
        self._release = weakref.finalize(self, _release, self.engine, self._sinks, self._exit_hook)

    # ------------------------------------------------------------------ public API

    @property
    def model(self) -> nn.Module:
        """The watched (unwrapped) model."""
        return self.engine.model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer (unwrapped), if given."""
        return self.engine.optimizer

    @property
    def scaler(self) -> Any:
        """The AMP GradScaler, if given."""
        return self.engine.scaler

    @property
    def detectors(self) -> list[Detector]:
        """The detectors in use."""
        return list(self.engine.detectors)

    @property
    def remedies(self) -> list[Remedy]:
        """The remedies in use (a remedy that failed is no longer among them)."""
        return list(self.engine.remedies)

    @property
    def layer_names(self) -> list[str]:
        """Layers in forward execution order (registration order before the first forward)."""
        with self._lock:
            return self.engine.layer_names

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first."""
        with self._lock:
            return self.engine.alerts

    @property
    def step_count(self) -> int:
        """Number of steps recorded so far (the next step's number)."""
        return self.engine.step_count

    def step(self, loss: Any = None, *, global_step: int | None = None) -> StepReport:
        """Records one step, after backward (and ``scaler.unscale_``), before ``optimizer.step``.

        Args:
            loss: The step's loss, checked for NaN/Inf (never synced).
            global_step: This step's number (e.g. Lightning's ``trainer.global_step``) instead
                of one more than the previous one; numbers should increase. A flush happens at the
                first step that reaches or passes a multiple of ``log_every_n_steps``.

        Returns:
            The step's report; ``report.skipped`` tells whether the update must not happen.

        Raises:
            GradientError: With ``nonfinite="raise"``, when a gradient or the loss is NaN/Inf.
        """
        with self._lock:
            if self._closed:
                self._warn_once("closed", "GradWatch.step() called after close(); ignored")
                return StepReport(step=self.step_count)
            try:
                outcome = self.engine.step(loss, global_step)
            except Exception as error:  # the training loop comes first
                self._warn_once(f"step:{type(error).__name__}", f"gradwatch step failed: {error!r}")
                return StepReport(step=self.step_count)
            for record in outcome.records:
                _write(self._sinks, record)
        self._announce(outcome.records)
        if outcome.error is not None:
            raise outcome.error
        return outcome.report

    def attach(self) -> GradWatch:
        """Runs :meth:`step` automatically before every ``optimizer.step()``; returns ``self``."""
        optimizer = self.optimizer
        if optimizer is None:
            raise ValueError("attach() needs the optimizer: GradWatch(model, optimizer)")
        check_step_hooks(optimizer, "attach()")
        with self._lock:
            if not self._attached and not self._closed:
                self.engine.run_before_optimizer_step(_AttachHook(self))
                self._attached = True
        return self

    def detach(self) -> None:
        """Removes every hook gradwatch installed (attach, forward order, activations, remedies)."""
        with self._lock:
            if self._attached:
                self.engine.run_before_optimizer_step(None)
                self._attached = False
            self.engine.close()

    def flush(self) -> list[Alert]:
        """Materialises everything pending: one host transfer, new alerts, sink writes."""
        with self._lock:
            try:
                record = self.engine.flush()
            except Exception as error:
                self._warn_once("flush", f"gradwatch flush failed: {error!r}")
                return []
            if record is None:
                return []
            _write(self._sinks, record)
        self._announce((record,))
        return list(record.new_alerts)

    def close(self) -> None:
        """Flushes, closes the sinks and removes every hook. Safe to call twice.

        Waits for the sinks (at most ``TensorBoardSink(close_timeout=)`` for a writer that hangs).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.flush()
        finally:
            with self._lock:
                self._release()

    def __repr__(self) -> str:
        """One line; reads only host values (no flush, no device sync)."""
        from gradwatch.display import format_repr

        config = self.config
        options = {"log_every_n_steps": str(config.log_every_n_steps)}
        if config.probe_every_n_steps != 1:
            options["probe_every_n_steps"] = str(config.probe_every_n_steps)
        for name, patterns in zip(("include", "exclude"), config.layer_patterns, strict=True):
            if patterns is not None:
                options[name] = repr(list(patterns))
        for name, objects in (("remedies", self.remedies), ("sinks", self._sinks)):
            if objects:
                options[name] = "[" + ", ".join(type(obj).__name__ for obj in objects) + "]"
        return format_repr(
            model=type(self.model).__name__,
            layers=self.engine.layout.num_layers,
            steps=self.step_count,
            alerts=self.alerts,
            options=options,
            closed=self._closed,
        )

    def _repr_html_(self) -> str:
        """The notebook view (Jupyter): the gradient-flow image of the retained window and the
        alerts with their advice. Flushes first, like :meth:`summary`."""
        from gradwatch.display import format_html

        self.flush()
        engine = self.engine
        history = engine.history
        title = (
            f"gradwatch: {type(self.model).__name__}, {engine.layout.num_layers} layers, "
            f"{self.step_count} steps"
        )
        return format_html(
            title=title,
            steps=history.host_steps,
            norms=history.host_norms,
            layer_names=engine.layer_names,
            alerts=self.alerts,
        )

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def last_norms(self) -> dict[str, float]:
        """Per-layer L2 gradient norm of the latest step (flushes pending steps)."""
        self.flush()
        with self._lock:
            return self.engine.last_norms()

    def history(self) -> dict[str, np.ndarray]:
        """The retained window: ``"step"`` and one norm array per layer (flushes pending steps)."""
        self.flush()
        with self._lock:
            return self.engine.history_dict()

    def summary(self) -> str:
        """A human-readable diagnosis: worst layers, alerts and advice."""
        from gradwatch.summary import format_summary

        self.flush()
        with self._lock:
            engine = self.engine
            return format_summary(
                steps=engine.step_count,
                layer_names=engine.layer_names,
                history=engine.history,
                alerts=engine.alerts,
                episodes=engine.book.episodes(),
            )

    def state_dict(self) -> dict[str, Any]:
        """Plain-value state (safe for ``torch.load(weights_only=True)``), flushed first."""
        self.flush()
        with self._lock:
            return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the step counter, history and statistics continue.

        A state that does not fit this model (other layers) is not restored: one warning, and
        the watch starts afresh.

        Raises:
            ValueError: ``state`` is not a gradwatch state at all.
        """
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"not a GradWatch state_dict: {type(state).__name__}")
        with self._lock:
            try:
                self.engine.load_state_dict(state)
            except ValueError as error:
                self._warn_once("state", f"GradWatch.load_state_dict: {error}")

    # ------------------------------------------------------------------ internals

    def _announce(self, records: Iterable[FlushRecord]) -> None:
        """Announces new alerts (the ``gradwatch`` logger, then ``on_alert``), outside the lock.

        Runs after the sinks were written, so an interrupt raised inside ``on_alert``
        (KeyboardInterrupt, SystemExit) finds the flush already written.
        """
        on_alert = self.config.on_alert
        for record in records:
            for alert in record.new_alerts:
                _log(alert)
                if on_alert is not None:
                    try:
                        on_alert(alert)
                    except Exception as error:  # the training loop comes first
                        self._warn_once(
                            "on_alert", f"gradwatch: on_alert raised {error!r}; ignored"
                        )


_DEFAULT_OPTIONS: dict[str, Any] = {
    "log_every_n_steps": 50,
    "histogram_every_n_steps": 0,
    "detectors": "default",
    "remedies": (),
    "check_activations": False,
    "track_updates": False,
    "on_alert": None,
    "nonfinite": "warn",
    "window": 1000,
    "include": None,
    "exclude": None,
    "probe_every_n_steps": 1,
    "fused": None,
}


class _AttachHook:
    """What :meth:`GradWatch.attach` runs first thing in every optimizer step (weakly bound)."""

    def __init__(self, watch: GradWatch) -> None:
        self._watch = weakref.ref(watch)

    def __call__(self) -> None:
        watch = self._watch()
        if watch is not None:
            watch.step()


class _ExitHook:
    """Closes (so flushes) a watch still open when the interpreter exits."""

    def __init__(self, watch: GradWatch) -> None:
        self._watch = weakref.ref(watch)

    def __call__(self) -> None:
        watch = self._watch()
        if watch is not None:
            try:
                watch.close()
            except Exception as error:
                warnings.warn(
                    f"gradwatch: closing at exit failed: {error!r}", RuntimeWarning, stacklevel=2
                )


def _release(
    engine: Engine,
    sinks: list[Sink],
    exit_hook: _ExitHook,
) -> None:
    """Releases a watch, once: by ``close()`` or when it is garbage-collected without it.

    What is still pending is flushed to the sinks (alerts go to the logger only: ``on_alert``
    belongs to the dropped watch), every hook is removed, learning rates are restored, the sinks
    are closed (their writer threads end).
    """
    atexit.unregister(exit_hook)
    try:
        record = engine.flush()
    except Exception as error:
        warnings.warn(f"gradwatch: the last flush failed: {error!r}", RuntimeWarning, stacklevel=2)
        record = None
    engine.close()  # removes every hook, the attached step included
    if record is not None:
        _write(sinks, record)
        for alert in record.new_alerts:
            _log(alert)
    for sink in sinks:
        try:
            sink.close()
        except Exception as error:
            warnings.warn(
                f"gradwatch: sink {type(sink).__name__} failed to close: {error!r}",
                RuntimeWarning,
                stacklevel=2,
            )
    sinks.clear()


def _write(sinks: list[Sink], record: FlushRecord) -> None:
    """Hands a flush to every sink; a sink that fails is disabled with one warning."""
    for sink in list(sinks):
        try:
            sink.write(record)
        except Exception as error:  # a failing sink never stops training
            sinks.remove(sink)
            warnings.warn(
                f"gradwatch: sink {type(sink).__name__} failed ({error!r}); it is disabled and "
                "training continues (history and alerts are kept)",
                RuntimeWarning,
                stacklevel=4,
            )


def _log(alert: Alert) -> None:
    log = {"info": logger.info, "warning": logger.warning, "error": logger.error}
    log[alert.severity]("%s", alert)


def _check_frontend_arguments(
    model: object,
    optimizer: object,
    logdir: object,
    writer: object,
    scaler: object,
    sinks: object,
    params: object,
) -> None:
    """The objects of the training loop, checked before anything is built."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "model is a TorchScript module, which cannot be hooked: watch the nn.Module before "
            "torch.jit.script/trace"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if logdir is not None and writer is not None:
        raise ValueError("pass either logdir or writer, not both")
    if logdir is not None and (
        not isinstance(logdir, str | os.PathLike)
        or not isinstance(os.fspath(logdir), str)
        or not os.fspath(logdir)
    ):
        raise ValueError(f"logdir must be a non-empty str or os.PathLike path, got {logdir!r}")
    if writer is not None and not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            f"writer must be a SummaryWriter or an object with its add_* methods, got {writer!r}"
        )
    if scaler is not None and not callable(getattr(scaler, "is_enabled", None)):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {scaler!r}")
    if not isinstance(sinks, Sequence) or isinstance(sinks, str):
        raise TypeError(f"sinks must be a sequence of gradwatch sinks, got {sinks!r}")
    for index, sink in enumerate(sinks):
        if not isinstance(sink, Sink):
            raise TypeError(f"sinks[{index}] must be a gradwatch Sink, got {sink!r}")
    if params is not None and (
        isinstance(params, torch.Tensor) or not isinstance(params, Iterable)
    ):
        raise TypeError(f"params must be an iterable of parameters or None, got {params!r}")


def _checked_params(params: Iterable[Any] | None) -> list[nn.Parameter] | None:
    """``params`` as a list of tensors (a generator is read once), else TypeError naming it."""
    if params is None:
        return None
    items = list(params)
    for index, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"params[{index}] must be a parameter tensor, got {item!r}")
    return items
