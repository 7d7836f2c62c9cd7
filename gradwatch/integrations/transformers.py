"""``GradWatchCallback``: gradwatch in a Hugging Face ``transformers.Trainer``, with one callback.

``Trainer(..., callbacks=[GradWatchCallback()])`` watches every optimizer step. How it records the
gradients *before* the Trainer's ``max_grad_norm`` clipping, while that clipping still happens
exactly: the Trainer clips right before its ``on_pre_optimizer_step`` event, reading
``args.max_grad_norm`` at every step. From ``on_step_begin`` to ``on_step_end`` of each optimizer
step the callback sets ``args.max_grad_norm`` to 0, so the Trainer only measures the norm (and
logs the same ``grad_norm``); in ``on_pre_optimizer_step`` the callback records the raw gradients,
lets its remedies act, then clips with ``torch.nn.utils.clip_grad_norm_(model.parameters(),
max_grad_norm)``, the call Accelerate makes for the Trainer; ``on_step_end`` puts the value back,
so evaluation, logging and the saved ``training_args.bin`` see it unchanged. Where Accelerate
clips another way (DeepSpeed, FSDP, XLA, Megatron-LM, SageMaker model parallelism, DTensor
parameters) or on transformers older than 5.3, the callback leaves the clipping alone and records
the clipped gradients (:attr:`GradWatchCallback.records_unclipped` is False, one warning says so).

The Trainer hands callbacks neither itself nor its reporting callbacks, so gradwatch reports
through its own sinks, bound to the backends and runs the Trainer reports to (``report_to``):
TensorBoard (a second event file in the Trainer's run directory), W&B (``wandb.run``) and MLflow
(the active run). Step numbers are the Trainer's: the update that the Trainer logs at
``global_step`` k is gradwatch step k (the first is 1).

Checkpoints: the callback is an ``ExportableState``; the watch's state is saved in
``trainer_state.json`` and restored when training resumes from a checkpoint.
"""

from __future__ import annotations

import base64
import glob
import math
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from typing_extensions import override

from gradwatch.engine.alerts import Alert, GradientError
from gradwatch.engine.checks import check_int
from gradwatch.engine.config import WatchConfig
from gradwatch.engine.detectors import Detector
from gradwatch.engine.layers import NamePatterns
from gradwatch.engine.optimizer import drop_gradients, optimizer_params, unwrap_optimizer
from gradwatch.engine.remedies import Remedy
from gradwatch.engine.warn import WarnOnce
from gradwatch.sinks.base import Sink
from gradwatch.watch import GradWatch

STATE_ATTRIBUTE = "gradwatch_state"
DEFAULT_CADENCE = 50  # when the Trainer logs by epoch or not at all
_OTHER_CLIPPING = ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM")
_PACKED = "__gradwatch_array__"
_PACK_MIN = 16  # shorter lists stay as they are


class GradWatchCallback(TrainerCallback, ExportableState):
    """Watches the gradients of a ``transformers.Trainer`` run at every optimizer step.

    Takes the keyword arguments of :class:`~gradwatch.watch.GradWatch` except ``model``,
    ``optimizer``, ``logdir``, ``writer``, ``scaler`` and ``params``, which come from the Trainer:

    - Records the gradients before the Trainer's ``max_grad_norm`` clipping, which it then applies
      itself, exactly (module docstring); remedies act before that clipping.
    - Steps are the Trainer's ``global_step`` of the update (1 for the first): gradwatch's
      ``grad_norm_total`` at step k is the Trainer's logged ``grad_norm`` at step k. With
      gradient accumulation, one step per optimizer update.
    - Reports, on the main process, to the Trainer's ``report_to`` backends: ``"tensorboard"``,
      ``"wandb"`` and ``"mlflow"`` (others: one warning; pass ``sinks=``). ``report=False`` turns
      this off.
    - Checkpoints: the watch's state (history, statistics, remedies) goes into
      ``trainer_state.json``, with its number arrays packed in base64 (about 5.4 bytes per layer
      and step of ``window``); ``trainer.train(resume_from_checkpoint=...)`` continues it. With
      ``restore_callback_states_from_checkpoint=True`` the Trainer keeps this very object.
    - ``nonfinite="raise"``: on a NaN/Inf gradient the update is skipped, training stops through
      ``control.should_training_stop`` and :attr:`stopped_by` holds the error.

    Example:
        >>> import gradwatch as gw  # doctest: +SKIP
        >>> callback = GradWatchCallback(remedies=[gw.LRBackoff()])  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.train(); callback.alerts  # doctest: +SKIP

    Args:
        log_every_n_steps: Flush cadence; None follows ``TrainingArguments.logging_steps``.
        histogram_every_n_steps: Gradient histogram cadence; 0 disables histograms.
        detectors: ``"default"``, a sequence of detector objects, or ``()`` for none.
        remedies: Remedy objects, applied in order, before the ``max_grad_norm`` clipping.
        check_activations: Forward hooks for saturation, dead units and the first non-finite output.
        track_updates: Measure the per-layer update/weight ratio on flush steps.
        on_alert: Called with each new alert, on the host (on every process).
        nonfinite: ``"warn"`` (alert) or ``"raise"`` (stop training, see above).
        window: Steps of history kept.
        include: Watch only the layers whose name matches (glob strings, compiled regexes).
        exclude: Leave out the layers whose name matches.
        probe_every_n_steps: Measure the gradients at every N-th step only (not with remedies or
            ``nonfinite="raise"``).
        sinks: Extra sinks, written on the main process.
        report: Write to the Trainer's ``report_to`` backends.

    Attributes:
        records_unclipped: Whether the watch sees the gradients before ``max_grad_norm`` clipping
            (None before training).
        stopped_by: The :class:`~gradwatch.alerts.GradientError` that stopped training, if any.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> GradWatchCallback:
        # With restore_callback_states_from_checkpoint=True the Trainer replaces each stateful
        # callback by ``type(callback)(**saved_args)``. Every instance gets a subclass of its own
        # whose constructor returns that instance, so the Trainer keeps the user's object (its
        # detectors, remedies, sinks and watch) instead of a default one.
        bound = cls.__dict__.get("_bound_instance")
        if bound is not None:
            return bound
        names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        own_class = type(cls.__name__, (cls,), {**names, "__doc__": cls.__doc__})
        instance: GradWatchCallback = super().__new__(own_class)
        setattr(own_class, "_bound_instance", instance)  # noqa: B010
        return instance

    def __reduce__(self) -> tuple[Any, ...]:
        """Copies and pickles rebuild a new, unbound callback of the plain class."""
        return (_rebuild, (GradWatchCallback, self._arguments))

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
        sinks: Sequence[Sink] = (),
        report: bool = True,
    ) -> None:
        if "config" in self.__dict__:
            return  # the Trainer rebuilding this very instance from a checkpoint (see __new__)
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        if not isinstance(sinks, Sequence) or isinstance(sinks, str):
            raise TypeError(f"sinks must be a sequence of gradwatch sinks, got {sinks!r}")
        for index, sink in enumerate(sinks):
            if not isinstance(sink, Sink):
                raise TypeError(f"sinks[{index}] must be a gradwatch Sink, got {sink!r}")
        if not isinstance(report, bool):
            raise TypeError(f"report must be a bool, got {report!r}")
        self._arguments: dict[str, Any] = {
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
            "sinks": sinks,
            "report": report,
        }
        self.config = WatchConfig(
            log_every_n_steps=log_every_n_steps or 1,  # None: the Trainer's, set at train begin
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
        )
        self.log_every_n_steps = log_every_n_steps
        self.sinks = list(sinks)
        self.report = report
        self.watch: GradWatch | None = None
        self.records_unclipped: bool | None = None
        self.stopped_by: GradientError | None = None
        self._max_grad_norm: float | None = None  # the user's value while the callback clips
        self._defers_clipping = False
        self._checkpoint_state: dict[str, Any] | None = None
        self._warn_once = WarnOnce()

    # ------------------------------------------------------------------ public API

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first."""
        return self.watch.alerts if self.watch is not None else []

    def summary(self) -> str:
        """The diagnosis: worst layers, alerts, advice."""
        if self.watch is None:
            return "gradwatch: no optimizer step watched yet"
        return self.watch.summary()

    @override
    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the watch's state, number arrays packed."""
        packed = pack_arrays(self.watch.state_dict()) if self.watch is not None else None
        return {"args": {}, "attributes": {STATE_ATTRIBUTE: packed}}

    @property
    def gradwatch_state(self) -> dict[str, Any] | None:
        """The packed watch state of the last checkpoint the Trainer restored into this object."""
        return self._checkpoint_state

    @gradwatch_state.setter
    def gradwatch_state(self, packed: dict[str, Any] | None) -> None:
        self._checkpoint_state = packed

    # ------------------------------------------------------------------ Trainer events

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Builds the watch (restoring checkpointed state) and decides who clips."""
        self._restore_max_grad_norm(args)  # a previous train() that died inside a step
        self._close_watch()
        self.watch = None
        self.stopped_by = None
        self.records_unclipped = None
        self._defers_clipping = False
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        try:
            self.watch = self._build_watch(args, state, model, optimizer)
            if state.global_step > 0:
                self._restore(self.watch, state)
        except Exception as error:  # the training loop comes first
            self._close_watch()
            self.watch = None
            self._warn_once("build", f"gradwatch is off for this run: {error!r}")
            return
        self._checkpoint_state = None
        reason = _other_clipping(optimizer, model) if args.max_grad_norm > 0 else None
        self._defers_clipping = args.max_grad_norm > 0 and reason is None
        self.records_unclipped = reason is None
        if reason is not None:
            self._warn_once(
                "clipping",
                f"gradwatch records the gradients after the Trainer's max_grad_norm clipping here "
                f"({reason}); use max_grad_norm=0 and gw.ClipNorm(...) to see them unclipped",
            )

    @override
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Takes the ``max_grad_norm`` clipping over for this optimizer step."""
        if self._defers_clipping and self.watch is not None and args.max_grad_norm > 0:
            self._max_grad_norm = float(args.max_grad_norm)
            args.max_grad_norm = 0.0

    @override
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Records the raw gradients, lets the remedies act, then clips as the Trainer would."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if self.watch is not None:
            try:
                self.watch.step(global_step=state.global_step + 1)
            except GradientError as error:  # nonfinite="raise"
                drop_gradients(optimizer_params(unwrap_optimizer(optimizer)))
                control.should_training_stop = True
                self.stopped_by = error
            except Exception as failure:  # the training loop comes first
                self._warn_once("step", f"gradwatch step failed: {failure!r}")
        if self._max_grad_norm is not None and model is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self._max_grad_norm)

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Puts ``max_grad_norm`` back; flushes before a stop (reporters end their runs then)."""
        self._restore_max_grad_norm(args)
        if control.should_training_stop and self.watch is not None:
            self.watch.flush()

    @override
    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flushes when an evaluation stops training (early stopping)."""
        if control.should_training_stop and self.watch is not None:
            self.watch.flush()

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flushes and closes the watch; prints the summary on the main process after alerts."""
        self._restore_max_grad_norm(args)
        if self.watch is not None and state.is_world_process_zero:
            try:
                self.watch.flush()
                if self.watch.alerts:
                    print(self.watch.summary())
            except Exception as error:
                self._warn_once("summary", f"gradwatch summary failed: {error!r}")
        self._close_watch()

    # ------------------------------------------------------------------ internals

    def _build_watch(self, args: Any, state: Any, model: Any, optimizer: Any) -> GradWatch:
        cadence = self.log_every_n_steps or _logging_steps(args, state)
        sinks = list(self.sinks)
        if self.report and state.is_world_process_zero:
            sinks += self._report_sinks(args, state)
        params = optimizer_params(unwrap_optimizer(optimizer)) if optimizer is not None else None
        changes: dict[str, Any] = {"log_every_n_steps": cadence}
        if args.max_grad_norm > 0 and self.config.fused is None:
            changes["fused"] = False  # max_grad_norm clipping follows: it must see the remedies
        return GradWatch(
            model, optimizer, sinks=sinks, params=params, config=self.config.replace(**changes)
        )

    def _report_sinks(self, args: Any, state: Any) -> list[Sink]:
        """Sinks writing to the backends and runs the Trainer itself reports to."""
        sinks: list[Sink] = []
        for name in args.report_to or []:
            try:
                sink = _report_sink(name, args, state)
            except Exception as error:
                self._warn_once(f"report:{name}", f"gradwatch cannot report to {name}: {error!r}")
                continue
            if sink is None:
                self._warn_once(
                    f"report:{name}",
                    f"gradwatch has no sink for report_to={name!r}; pass one with sinks=[...]",
                )
            else:
                sinks.append(sink)
        return sinks

    def _restore(self, watch: GradWatch, state: Any) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several callbacks of this class: the first one's
            saved = saved[0] if saved else None
        packed = (saved or {}).get("attributes", {}).get(STATE_ATTRIBUTE)
        packed = packed or self._checkpoint_state
        if not packed:
            self._warn_once(
                "resume",
                f"gradwatch: the checkpoint holds no GradWatchCallback state; the history starts "
                f"afresh at step {state.global_step}",
            )
            return
        watch.load_state_dict(unpack_arrays(packed))

    def _restore_max_grad_norm(self, args: Any) -> None:
        if self._max_grad_norm is not None:
            args.max_grad_norm = self._max_grad_norm
            self._max_grad_norm = None

    def _close_watch(self) -> None:
        if self.watch is not None:
            try:
                self.watch.close()
            except Exception as error:
                self._warn_once("close", f"gradwatch close failed: {error!r}")


def _rebuild(cls: type[GradWatchCallback], arguments: dict[str, Any]) -> GradWatchCallback:
    return cls(**arguments)


def _logging_steps(args: Any, state: Any) -> int:
    """The Trainer's logging interval in steps (``logging_steps`` may be a fraction of the run)."""
    strategy = getattr(args, "logging_strategy", "steps")
    if getattr(strategy, "value", strategy) != "steps":
        return DEFAULT_CADENCE
    steps = getattr(state, "logging_steps", None) or args.logging_steps
    return max(1, math.ceil(steps)) if steps and steps > 0 else DEFAULT_CADENCE


def _other_clipping(optimizer: Any, model: Any) -> str | None:
    """Why the callback cannot redo the Trainer's clipping exactly (None: it can)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    if (major, minor) < (5, 3):
        return f"transformers {transformers.__version__} only measures the norm while clipping"
    accelerator_state = getattr(optimizer, "accelerator_state", None)
    kind = getattr(getattr(accelerator_state, "distributed_type", None), "name", "NO")
    if kind in _OTHER_CLIPPING:
        return f"Accelerate clips inside its {kind} path"
    from transformers.utils import is_sagemaker_mp_enabled

    if is_sagemaker_mp_enabled():
        return "SageMaker model parallelism clips inside its optimizer"
    from torch.distributed.tensor import DTensor

    if model is not None and any(isinstance(p, DTensor) for p in model.parameters()):
        return "DTensor parameters are clipped per mesh"
    return None


def _report_sink(name: str, args: Any, state: Any) -> Sink | None:
    """The sink for one ``report_to`` backend (None: gradwatch has none for it)."""
    if name == "tensorboard":
        from gradwatch.sinks.tensorboard import TensorBoardSink

        return TensorBoardSink(logdir=trainer_tensorboard_dir(args, state))
    if name == "wandb":
        from gradwatch.sinks.wandb import WandbSink

        return WandbSink()  # wandb.run, started by the Trainer's WandbCallback.on_train_begin
    if name == "mlflow":
        from gradwatch.sinks.mlflow import MlflowSink, import_mlflow

        run = import_mlflow().active_run()  # bound now: MLflowCallback ends it at train end
        if run is None:
            raise RuntimeError("no active MLflow run")
        return MlflowSink(run_id=run.info.run_id)
    return None


def trainer_tensorboard_dir(args: Any, state: Any) -> str:
    """The run directory of the Trainer's ``TensorBoardCallback`` (created just before).

    ``TENSORBOARD_LOGGING_DIR`` when set, else the newest ``<output_dir>/runs/<time>_<host>``
    (``<...>/<trial>`` in a hyperparameter search).
    """
    explicit = os.getenv("TENSORBOARD_LOGGING_DIR")
    if explicit:
        return os.path.expanduser(explicit)
    pattern = os.path.join(args.output_dir, "runs", f"*_{socket.gethostname()}")
    if state.is_hyper_param_search and state.trial_name:
        pattern = os.path.join(pattern, state.trial_name)
    found = [path for path in glob.glob(pattern) if os.path.isdir(path)]
    if found:
        return max(found, key=os.path.getmtime)
    return os.path.join(args.output_dir, "runs", "gradwatch")


def pack_arrays(value: Any) -> Any:
    """``value`` with every long list of numbers replaced by a base64 string of its array.

    ``trainer_state.json`` is written with ``indent=2``: one line (about 25 bytes) per number.
    Packed, a number costs 5.4 bytes (float32 or int32 when exact, else 64 bits); unpacking gives
    back the same plain values.
    """
    if isinstance(value, dict):
        return {key: pack_arrays(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        array = _numeric_array(value)
        if array is None:
            return [pack_arrays(item) for item in value]
        narrow = array.astype(np.float32 if array.dtype == np.float64 else np.int32)
        if np.array_equal(narrow.astype(array.dtype), array, equal_nan=array.dtype.kind == "f"):
            array = narrow
        return {
            _PACKED: base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"),
            "dtype": array.dtype.name,
            "shape": list(array.shape),
        }
    return value


def unpack_arrays(value: Any) -> Any:
    """Reverses :func:`pack_arrays`."""
    if isinstance(value, dict):
        if _PACKED in value:
            data = base64.b64decode(value[_PACKED])
            array = np.frombuffer(data, dtype=np.dtype(value["dtype"])).reshape(value["shape"])
            wide = array.astype(np.int64 if array.dtype.kind == "i" else np.float64)
            return wide.tolist()
        return {key: unpack_arrays(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unpack_arrays(item) for item in value]
    return value


def _numeric_array(values: list[Any] | tuple[Any, ...]) -> np.ndarray | None:
    """A rectangular int64/float64 array of ``values`` when worth packing, else None."""
    flat = values
    while flat and all(isinstance(item, list) for item in flat):
        if len({len(item) for item in flat}) != 1:
            return None
        flat = [element for item in flat for element in item]
    if len(flat) < _PACK_MIN or not all(
        isinstance(item, int | float) and not isinstance(item, bool) for item in flat
    ):
        return None
    dtype = np.int64 if all(isinstance(item, int) for item in flat) else np.float64
    return np.asarray(values, dtype=dtype)


__all__ = ["GradWatchCallback"]
