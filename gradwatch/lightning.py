"""``GradWatchCallback``: gradwatch inside a Lightning ``Trainer``, with one callback.

The callback adapts Lightning to the engine and keeps no statistics of its own: it validates its
options into one :class:`~gradwatch.engine.config.WatchConfig`, builds one
:class:`~gradwatch.watch.GradWatch` per optimizer from it when training starts and steps it in
``on_before_optimizer_step``, where Lightning has finished the backward passes of every accumulated
micro-batch and (native AMP) unscaled the gradients, and has not yet clipped them
(``gradient_clip_val`` runs right after this hook, then ``optimizer.step``). So gradwatch records
the raw gradients, its remedies act first and Lightning's own clipping composes after them.

Both ``pytorch_lightning`` and ``lightning.pytorch`` are supported: the callback derives from the
``Callback`` class of each package that is installed (of both when both are), so the same class
works with either ``Trainer``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from gradwatch.engine.alerts import Alert, GradientError
from gradwatch.engine.checks import check_int
from gradwatch.engine.config import WatchConfig
from gradwatch.engine.detectors import Detector
from gradwatch.engine.layers import NamePatterns
from gradwatch.engine.optimizer import drop_gradients, optimizer_params, unwrap_optimizer
from gradwatch.engine.records import FlushRecord
from gradwatch.engine.remedies import Remedy
from gradwatch.engine.warn import WarnOnce
from gradwatch.sinks.base import Sink
from gradwatch.sinks.metrics import LoggerMetricsSink
from gradwatch.watch import GradWatch

_PACKAGES = ("pytorch_lightning", "lightning.pytorch")


def _import_installed(suffix: str) -> list[Any]:
    """``<package><suffix>`` of every installed Lightning package, in :data:`_PACKAGES` order."""
    modules = []
    for package in _PACKAGES:
        try:
            modules.append(importlib.import_module(package + suffix))
        except ImportError:
            continue
    return modules


def _callback_base() -> type:
    """The ``Callback`` of the installed Lightning package, or a class deriving from both."""
    bases = tuple(module.Callback for module in _import_installed(""))
    if not bases:
        raise ImportError(
            "gradwatch.lightning needs Lightning: pip install 'gradwatch[lightning]' "
            "(pytorch-lightning) or pip install lightning"
        )
    return bases[0] if len(bases) == 1 else type("_LightningCallback", bases, {})


if TYPE_CHECKING:
    from pytorch_lightning import Callback as _CallbackBase
else:
    _CallbackBase = _callback_base()

_LOGGER_MODULES = _import_installed(".loggers")
_TENSORBOARD_LOGGERS = tuple(module.TensorBoardLogger for module in _LOGGER_MODULES)
_WANDB_LOGGERS = tuple(module.WandbLogger for module in _LOGGER_MODULES)
_MLFLOW_LOGGERS = tuple(module.MLFlowLogger for module in _LOGGER_MODULES)
_STATE_VERSION = 1


class GradWatchCallback(_CallbackBase):
    """Watches the gradients of a ``LightningModule`` at every optimizer step.

    Takes the keyword arguments of :class:`~gradwatch.watch.GradWatch` except ``model``,
    ``optimizer``, ``logdir``, ``writer``, ``scaler`` and ``params``, which come from the trainer:

    - One watch per optimizer, over that optimizer's parameters (``callback.watches``;
      ``callback.watch`` is the first). Step numbers are ``trainer.global_step``, one per optimizer
      step: with ``accumulate_grad_batches=k`` one step per ``k`` batches; under manual optimization
      with several optimizers, each watch sees the global steps of its own optimizer (its flushes
      follow the cadence; histograms and update ratios are taken at step numbers that are
      multiples of their cadence, so some may not occur). Extra watches get deep copies of the
      ``detectors`` and ``remedies`` given (the first watch uses them as is).
    - Logging, on rank 0: with one optimizer and a ``TensorBoardLogger``, everything goes to the
      logger's own ``SummaryWriter`` (same run directory). A ``WandbLogger`` or ``MLFlowLogger``
      gets every step and the alert text in its own run
      (:class:`~gradwatch.sinks.wandb.WandbSink`, :class:`~gradwatch.sinks.mlflow.MlflowSink`);
      every other logger receives the scalars through ``log_metrics`` and the alert text in
      ``<log_dir>/gradwatch_alerts.md`` when it has a ``log_dir``
      (:class:`~gradwatch.sinks.metrics.LoggerMetricsSink`). With several optimizers, the
      scalars of optimizer ``i`` are under ``gradwatch/optimizer_<i>/...`` in every logger.
      Without a logger nothing is written and alerts still work.
    - AMP: with ``precision="16-mixed"`` the trainer's ``GradScaler`` is used so overflow steps are
      recognised; the gradients of a fused optimizer (which unscales inside ``step``) are still
      scaled when the watch runs, and their norms are divided by the scale on the device; bf16
      needs no scaler.
    - Remedies with a fused optimizer act inside its kernel (see ``GradWatch(fused=...)``); with
      ``Trainer(gradient_clip_val=...)`` they act explicitly, so that Lightning's clipping still
      sees their result.
    - ``nonfinite="raise"`` stops training through the trainer: on a NaN/Inf gradient the update
      of that step is skipped, the decision is reduced over every rank (one tiny collective per
      step, only with this policy) and ``trainer.should_stop`` is set on all of them; ``fit``
      returns normally and :attr:`stopped_by` holds the :class:`~gradwatch.alerts.GradientError`.
    - Checkpoints hold every watch's ``state_dict()`` under :attr:`state_key`; resuming continues
      the history and statistics (so does calling ``fit`` again on a trainer that already
      trained). A checkpoint without gradwatch state loads with a warning.
    - Under ``ddp_spawn`` the training runs in worker processes: the callback object of the main
      process stays empty after ``fit`` (Lightning sends back only weights and metrics); the results
      are in the logger and in the checkpoints. ``ddp`` keeps them in the main process (rank 0).

    Example:
        >>> import gradwatch as gw  # doctest: +SKIP
        >>> callback = GradWatchCallback(remedies=[gw.ZClip()])  # doctest: +SKIP
        >>> logger = TensorBoardLogger("runs")  # doctest: +SKIP
        >>> trainer = pl.Trainer(callbacks=[callback], logger=logger)  # doctest: +SKIP

    Args:
        log_every_n_steps: Flush cadence; None follows ``Trainer(log_every_n_steps=...)``.
        histogram_every_n_steps: Gradient histogram cadence; 0 disables histograms.
        detectors: ``"default"``, a sequence of detector objects, or ``()`` for none.
        remedies: Remedy objects, applied in order, before Lightning's gradient clipping.
        check_activations: Forward hooks for saturation, dead units and the first non-finite output.
        track_updates: Measure the per-layer update/weight ratio on flush steps.
        on_alert: Called with each new alert, on the host (on every rank); warnings and errors
            at most two steps after the step they describe.
        nonfinite: ``"warn"`` (alert) or ``"raise"`` (stop training, see above).
        window: Steps of history kept.
        include: Watch only the layers whose name matches (glob strings, compiled regexes).
        exclude: Leave out the layers whose name matches.
        probe_every_n_steps: Measure the gradients at every N-th step only (not with remedies or
            ``nonfinite="raise"``).
        fused: Where clipping and skipping act (see ``GradWatch``); None: inside a fused
            optimizer's kernel when exact and the trainer does not clip.
        sinks: Extra sinks, written on rank 0 (with several optimizers they receive every watch's
            records and are closed once).
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 0,
        detectors: str | Sequence[Detector] = "default",
        remedies: Sequence[Remedy] = (),
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
    ) -> None:
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        self.config = WatchConfig(
            log_every_n_steps=log_every_n_steps or 1,  # None: the trainer's, set at fit
            histogram_every_n_steps=histogram_every_n_steps,
            detectors=detectors,
            remedies=remedies,
            check_activations=check_activations,
            track_updates=track_updates,
            on_alert=on_alert,
            nonfinite=nonfinite,
            window=window,
            include=include,
            exclude=exclude,
            probe_every_n_steps=probe_every_n_steps,
            fused=fused,
        )
        if not isinstance(sinks, Sequence) or isinstance(sinks, str):
            raise TypeError(f"sinks must be a sequence of gradwatch sinks, got {sinks!r}")
        for index, sink in enumerate(sinks):
            if not isinstance(sink, Sink):
                raise TypeError(f"sinks[{index}] must be a gradwatch Sink, got {sink!r}")
        self.log_every_n_steps = log_every_n_steps
        self.sinks = list(sinks)
        # pristine copy for the watches of a second, third... optimizer (before any bind)
        self._template = self.config.fresh_copy()
        self._watches: list[GradWatch] = []
        self._by_optimizer: dict[int, GradWatch] = {}
        self._pending_state: dict[str, Any] | None = None
        self._restored = False
        self._warn_once = WarnOnce()
        self.stopped_by: GradientError | None = None

    # ------------------------------------------------------------------ public API

    @property
    def state_key(self) -> str:
        """Checkpoint key, built from the arguments that shape the state (detectors, remedies)."""
        config = self.config
        return self._generate_state_key(
            detectors=[type(d).__name__ for d in config.detector_objects],
            remedies=[type(r).__name__ for r in config.remedies],
        )

    @property
    def watch(self) -> GradWatch | None:
        """The watch of the first optimizer (None before ``fit``)."""
        return self._watches[0] if self._watches else None

    @property
    def watches(self) -> list[GradWatch]:
        """One watch per optimizer, in the trainer's optimizer order (empty before ``fit``)."""
        return list(self._watches)

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, of every watch, oldest step first."""
        alerts = [alert for watch in self._watches for alert in watch.alerts]
        return sorted(alerts, key=lambda alert: alert.step)

    def summary(self) -> str:
        """The diagnosis of every watch (worst layers, alerts, advice)."""
        if not self._watches:
            return "gradwatch: no optimizer step watched yet"
        if len(self._watches) == 1:
            return self._watches[0].summary()
        return "\n\n".join(
            f"optimizer {index}:\n{watch.summary()}" for index, watch in enumerate(self._watches)
        )

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Builds one watch per optimizer (restoring checkpointed state) before the first batch."""
        state = self._pending_state
        if state is None and self._watches and trainer.global_step > 0:
            state = self.state_dict()  # fit() again on a trainer that already trained: continue
        self._close_watches()
        self._watches = []
        self._pending_state = None
        self.stopped_by = None
        if trainer.ckpt_path is not None and not self._restored and trainer.is_global_zero:
            warnings.warn(
                f"gradwatch: the checkpoint {trainer.ckpt_path} holds no GradWatchCallback state "
                f"under {self.state_key!r} (saved without this callback, by an older version or "
                f"with other detectors/remedies); the history starts afresh at step "
                f"{trainer.global_step}",
                UserWarning,
                stacklevel=2,
            )
        self._restored = False
        try:
            self._build_watches(trainer, pl_module)
            if state is not None:
                self._load_into_watches(state)
        except Exception as error:  # the training loop comes first
            self._close_watches()
            self._warn_once("build", f"gradwatch is off for this fit: {error!r}")

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Steps the optimizer's watch: after backward and AMP unscaling, before clipping."""
        optimizer = unwrap_optimizer(optimizer)  # a LightningOptimizer
        watch = self._by_optimizer.get(id(optimizer))
        if watch is None:
            return
        error: GradientError | None = None
        try:
            watch.step(global_step=trainer.global_step)
        except GradientError as raised:
            error = raised
        except Exception as failure:  # the training loop comes first
            self._warn_once("step", f"gradwatch step failed: {failure!r}")
        if self.config.nonfinite == "raise" and trainer.strategy.reduce_boolean_decision(
            error is not None, all=False
        ):
            drop_gradients(optimizer_params(optimizer))  # the poisoned update does not happen
            trainer.should_stop = True
            self.stopped_by = error

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Flushes and closes the watches; prints the summary on rank 0 when there were alerts."""
        if trainer.is_global_zero and self._watches:
            try:
                for watch in self._watches:
                    watch.flush()
                if self.alerts:
                    print(self.summary())
            except Exception as error:
                self._warn_once("summary", f"gradwatch summary failed: {error!r}")
        self._close_watches()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Flushes and closes the watches so nothing recorded is lost."""
        self._close_watches()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Every watch's plain-value state (what :meth:`load_state_dict` restores)."""
        if not self._watches:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {
            "version": _STATE_VERSION,
            "watches": [watch.state_dict() for watch in self._watches],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`, now or when the watches are built."""
        if not isinstance(state_dict.get("watches"), list):
            self._warn_once(
                "state",
                "gradwatch: the checkpointed GradWatchCallback state is not readable; ignored",
            )
            return
        self._restored = True
        if self._watches:
            self._load_into_watches(state_dict)
        else:
            self._pending_state = state_dict

    # ------------------------------------------------------------------ internals

    def _build_watches(self, trainer: Any, pl_module: Any) -> None:
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if not optimizers:
            self._warn_once("no-optimizer", "gradwatch: the trainer has no optimizer to watch")
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        cadence = self.log_every_n_steps or trainer.log_every_n_steps
        several = len(optimizers) > 1
        changes: dict[str, Any] = {"log_every_n_steps": cadence}
        if trainer.gradient_clip_val and self.config.fused is None:
            changes["fused"] = False  # Lightning clips after the watch: it must see the result
        for index, optimizer in enumerate(optimizers):
            writer, sinks = self._outputs(trainer, index, several)
            config = self.config if index == 0 else self._template.fresh_copy()
            watch = GradWatch(
                pl_module,
                optimizer,
                writer=writer,
                scaler=scaler,
                sinks=sinks,
                params=optimizer_params(optimizer),
                config=config.replace(**changes),
            )
            self._watches.append(watch)
            self._by_optimizer[id(optimizer)] = watch

    def _outputs(self, trainer: Any, index: int, several: bool) -> tuple[Any, list[Sink]]:
        """The TensorBoard writer and the sinks of optimizer ``index``'s watch."""
        sinks: list[Sink] = [s if index == 0 else _WriteOnly(s) for s in self.sinks]
        writer = None
        prefix = f"gradwatch/optimizer_{index}" if several else "gradwatch"
        for logger in trainer.loggers:
            if not several and writer is None and isinstance(logger, _TENSORBOARD_LOGGERS):
                writer = logger.experiment if trainer.is_global_zero else None
            elif trainer.is_global_zero:
                sinks.append(logger_sink(logger, prefix))
        return writer, sinks

    def _load_into_watches(self, state: dict[str, Any]) -> None:
        saved = state.get("watches", [])
        if len(saved) != len(self._watches):
            self._warn_once(
                "state-count",
                f"gradwatch: the checkpoint holds {len(saved)} watch state(s) for "
                f"{len(self._watches)} optimizer(s); the history starts afresh",
            )
            return
        for watch, watch_state in zip(self._watches, saved, strict=True):
            watch.load_state_dict(watch_state)

    def _close_watches(self) -> None:
        for watch in self._watches:
            try:
                watch.close()
            except Exception as error:
                self._warn_once("close", f"gradwatch close failed: {error!r}")
        self._by_optimizer = {}


def logger_sink(logger: Any, prefix: str) -> Sink:
    """The sink for a Lightning logger: W&B and MLflow get their own (every step, alert text),
    every other logger :class:`~gradwatch.sinks.metrics.LoggerMetricsSink`."""
    if isinstance(logger, _WANDB_LOGGERS):
        from gradwatch.sinks.wandb import WandbSink

        return WandbSink(logger.experiment, prefix=prefix)
    if isinstance(logger, _MLFLOW_LOGGERS):
        from gradwatch.sinks.mlflow import MlflowSink

        return MlflowSink(run_id=logger.run_id, client=logger.experiment, prefix=prefix)
    return LoggerMetricsSink(logger, prefix=prefix)


class _WriteOnly(Sink):
    """Shares a user's sink with a further watch: forwards writes, leaves closing to the first."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    @override
    def write(self, record: FlushRecord) -> None:
        """Forwards the record."""
        self.sink.write(record)


__all__ = ["GradWatchCallback"]
