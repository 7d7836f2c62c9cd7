"""``Engine``: the functional core behind every frontend.

One :meth:`Engine.step` per optimizer step: the probe measures per-layer gradient norms in one
foreach pass, the step-cadence detectors look at them, the remedies decide, their decisions are
applied, the history ring buffer takes the row. Everything stays on the device. Every
``log_every_n_steps`` steps :meth:`Engine.flush` moves one packed tensor to the host, runs the
flush-cadence detectors, turns detections into alerts and returns a
:class:`~gradwatch.engine.records.FlushRecord` for the frontend to hand to its sinks. A step's
warning/error detections also reach the host through a :class:`~gradwatch.engine.mailbox.Mailbox`
(no sync); when they hold a new alert, the engine flushes at once, out of cadence. The engine
never writes files, calls user callbacks or raises into the training loop: the frontend decides
what to do with records, alerts and errors.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch.engine import distributed
from gradwatch.engine.activations import ActivationMonitor, activation_modules
from gradwatch.engine.advice import advise
from gradwatch.engine.alerts import Alert, AlertBook, AlertKind, GradientError
from gradwatch.engine.config import WatchConfig
from gradwatch.engine.detectors import Detector, NonFiniteDetector
from gradwatch.engine.histograms import GradientHistograms
from gradwatch.engine.history import NormHistory
from gradwatch.engine.layers import (
    ForwardOrder,
    Layer,
    Layout,
    Structure,
    find_layers,
    forward_permutation,
    merge_order,
    select_layers,
    unwrap,
)
from gradwatch.engine.learning_rates import LearningRates
from gradwatch.engine.mailbox import Mailbox
from gradwatch.engine.observation import (
    Detection,
    Observation,
    RemedyInput,
    StepReport,
    finite,
)
from gradwatch.engine.optimizer import (
    StepSource,
    check_step_hooks,
    clip_,
    clip_divisor,
    drop_gradients,
    fused_blocker,
    loss_scale_in_gradients,
    optimizer_params,
    owns_step_hooks,
    step_source,
    unwrap_optimizer,
)
from gradwatch.engine.origin import OriginTracer
from gradwatch.engine.output_layer import OutputCapture, output_layers
from gradwatch.engine.probe import GradientProbe
from gradwatch.engine.profile import ModelProfile
from gradwatch.engine.records import FlushRecord
from gradwatch.engine.remedies import Remedy
from gradwatch.engine.running_stats import RunningStats
from gradwatch.engine.text import format_layers
from gradwatch.engine.thresholds import ALERT_CLEAR_STEPS, AMP_PERSISTENT_STEPS
from gradwatch.engine.transfer import to_host
from gradwatch.engine.warn import WarnOnce

STATE_VERSION = 1
_MAX_STEP = 2**62  # step numbers beyond this would overflow the history's int64 steps


@dataclass(frozen=True)
class StepOutcome:
    """What one :meth:`Engine.step` produced.

    Attributes:
        report: The step's report (returned to the user).
        records: The flushes that happened during the step, oldest first, for the sinks (a
            second one when the step noticed that the model changed and flushed the steps
            before the change first).
        error: With ``nonfinite="raise"``: the error to raise once the records are written.
    """

    report: StepReport
    records: tuple[FlushRecord, ...] = ()
    error: GradientError | None = None


class Engine:
    """Per-layer gradient statistics, detections, remedies and alerts of one model.

    Args:
        model: The module to watch (``DistributedDataParallel`` and ``torch.compile`` wrappers are
            looked through).
        optimizer: Its optimizer (wrappers such as Accelerate's are looked through), or None.
        config: The validated options.
        scaler: The AMP ``GradScaler``, so overflow steps are recognised.
        params: Watch only these parameters of ``model``; default every trainable parameter.

    Attributes:
        fused: Clipping and skipping act inside the optimizer's fused kernel (``grad_scale`` and
            ``found_inf``, no pass over the gradients, no host read); else explicitly.

    Raises:
        ValueError: No trainable parameter to watch, a remedy needs the missing optimizer, or
            ``fused=True`` with an optimizer that does not allow it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: WatchConfig | None = None,
        *,
        scaler: Any = None,
        params: Iterable[nn.Parameter] | None = None,
    ) -> None:
        self.config = config or WatchConfig()
        self.model = unwrap(model)
        self.optimizer: torch.optim.Optimizer | None = (
            unwrap_optimizer(optimizer) if optimizer is not None else None
        )
        self.config.check_optimizer(self.optimizer is not None)
        self.scaler = scaler
        self.detectors: list[Detector] = list(self.config.detector_objects)
        self.remedies: list[Remedy] = list(self.config.remedies)
        self._params = list(params) if params is not None else None
        layers = find_layers(self.model, self._params)
        if not layers:
            reason = (
                "params= selects none of its trainable parameters"
                if params is not None
                else "every parameter has requires_grad=False"
            )
            model_name = type(self.model).__name__
            raise ValueError(f"model has no trainable parameters to watch: {model_name} ({reason})")
        layers, unused_patterns = _select(self.model, layers, self.config)
        if self.optimizer is not None:
            watched = {id(p) for layer in layers for p in layer.params}
            if not any(id(p) in watched for p in optimizer_params(self.optimizer)):
                raise ValueError(
                    f"optimizer ({type(self.optimizer).__name__}) updates none of the watched "
                    "parameters of the model: pass the optimizer of this model"
                )
        self.activations = ActivationMonitor(self.model) if self.config.check_activations else None
        activation_names = self.activations.names if self.activations is not None else ()
        self.origin = self._origin_tracer()
        self.layout = Layout.build(layers, activation_names, self._module_names())
        self.profile = ModelProfile.inspect(
            self.model, self.optimizer, remedies=self.remedies, scaler=scaler
        )
        self.book = AlertBook(clear_after=ALERT_CLEAR_STEPS * self.config.probe_every_n_steps)
        self.step_count = 0
        self._order = ForwardOrder(layers, self.model)
        self._structure = self._current_structure(layers)
        self._recheck = False  # the previous step failed: look for a changed model
        self.fused = self._fused_path()
        self._source: StepSource | None = None
        if self.optimizer is not None and owns_step_hooks(self.optimizer):
            self._source = step_source(self.optimizer)
        elif self.optimizer is not None:  # e.g. DeepSpeed's: skipping drops the gradients here
            for remedy in self.remedies:
                if remedy.scales_lr:
                    check_step_hooks(self.optimizer, f"{type(remedy).__name__} (an LR remedy)")
        self._running_stats = RunningStats(self.model, restore=any(r.skips for r in self.remedies))
        needs_output = any(r.needs_output_layer for r in self.remedies)
        self._output_capture = OutputCapture(self.model) if needs_output else None
        self._output_params: frozenset[int] | None = None
        self._registration = list(self.model.parameters())
        self._warn_once = WarnOnce()
        for pattern in unused_patterns:
            self._warn_once(
                f"pattern-{pattern}", f"gradwatch: {pattern} matches no layer of the model"
            )
        # This step's detection flags are only gathered for remedies and the "raise" policy.
        self._needs_flags = bool(self.remedies) or self.config.nonfinite == "raise"
        self._last_report: StepReport | None = None
        self._fingerprint: list[tuple[weakref.ref[torch.Tensor], int]] | None = None
        # Layout-dependent parts, rebuilt by ``_relayout``.
        device = self.layout.device
        self.probe = GradientProbe(layers, device, self._registration)
        self.history = NormHistory(self.config.history_window, len(layers), device)
        self.histograms = (
            GradientHistograms(self.layout) if self.config.histogram_every_n_steps else None
        )
        self._pending: list[list[Detection]] = [[] for _ in self.detectors]
        # Early alerts: this step's warning/error detections reach the host through the mailbox.
        self._mailbox = Mailbox(device) if Mailbox.supports(device) else None
        self._seen: dict[AlertKind, int] = {}  # latest step each kind was seen in the mailbox
        self._materialised = -1  # detections up to this step are in the book
        self._carry: list[_Rows] = []  # rows of early flushes, for the next regular record
        self._overflow_rows: list[torch.Tensor] = []
        self._histogram_rows: list[tuple[int, torch.Tensor]] = []
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self._false = torch.zeros((), dtype=torch.bool, device=device)
        self._overflow_run = torch.zeros((), device=device)
        self._weight_norms = torch.zeros(len(layers), device=device)
        self._weights_stale = True  # measured at the first step, then at every flush step
        self._update_ratio: torch.Tensor | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._previous_applied = self._true
        self._lrs = LearningRates(self.optimizer, self.layout) if self.optimizer else None
        self._lr_scale: torch.Tensor | float | None = None  # the LR remedies' previous scale
        self._bind()

    # ------------------------------------------------------------------ public

    @property
    def layer_names(self) -> list[str]:
        """Layers in forward execution order (registration order before the first forward)."""
        if self._order.active and self._order.has_run:
            self._finish_forward_order()
        return self.layout.names

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first."""
        return list(self.book.alerts)

    @property
    def clips(self) -> bool:
        """A remedy scales the gradients (clip coefficients are recorded)."""
        return any(r.clips for r in self.remedies)

    @property
    def scales_lr(self) -> bool:
        """A remedy scales the learning rate (LR scales are recorded)."""
        return any(r.scales_lr for r in self.remedies)

    def step(self, loss: Any = None, global_step: int | None = None) -> StepOutcome:
        """Records one step, after backward (and ``scaler.unscale_``), before ``optimizer.step``.

        A model that changed since the layers were read (a layer replaced, parameters re-created,
        moved or unfrozen, a module added) is noticed when the pattern of present gradients is new,
        after a step failed and at every flush: the steps so far are flushed, the layers are read
        again (one warning) and the step counter, history and alerts carry over.

        Args:
            loss: The step's loss (a tensor or a number), checked for NaN/Inf (never synced). A
                value that is not a number is dropped with one warning; the gradients still count.
            global_step: This step's number instead of one more than the previous one.
        """
        try:
            return self._step(loss, global_step)
        except Exception:
            self._recheck = True  # e.g. parameters moved to another device
            raise

    def _step(self, loss: Any, global_step: int | None) -> StepOutcome:
        if self._order.active:
            self._finish_forward_order()
        step = self._step_number(global_step)
        if not self.config.probes(step):
            return self._unprobed(step)
        current = self.probe.current_grads()
        pattern = self.probe.grad_pattern(current)
        records: tuple[FlushRecord, ...] = ()
        if self._recheck or not self.probe.knows(pattern):
            self._recheck = False
            layers = self._changed_layers()
            if layers is not None:
                record = self._flush()  # the steps so far, in the layout they were taken in
                records = (record,) if record is not None else ()
                self._rescan(layers)
                current = self.probe.current_grads()
                pattern = self.probe.grad_pattern(current)
        probe = self.probe
        if not any(pattern):
            self._warn_once(
                "no-grad", "GradWatch.step() found no gradients: call it after loss.backward()"
            )
            return StepOutcome(StepReport(step=self.step_count), records)
        fingerprint = self._grad_fingerprint(pattern)
        if self._last_report is not None and _same(self._fingerprint, fingerprint):
            self._warn_once(
                "twice",
                "GradWatch.step() called twice for one backward pass; the repeat is ignored",
            )
            return StepOutcome(self._last_report)
        cadence = self.config.log_every_n_steps
        flush_due = (step + 1) // cadence > self.step_count // cadence  # reached/passed a multiple

        sq_norms, has_grad = probe.grad_sq_norms(pattern, current)
        loss_scale = loss_scale_in_gradients(self.scaler, self.optimizer)
        if loss_scale is not None:  # AMP not unscaled yet (a fused kernel unscales): true norms
            scale = loss_scale.to(sq_norms.device, sq_norms.dtype)
            sq_norms = sq_norms / scale / scale
        norms = sq_norms.sqrt()
        total = sq_norms.sum().sqrt()
        if flush_due or self._weights_stale:
            self._weight_norms = probe.weight_sq_norms().sqrt()
            self._weights_stale = False
        update_ratio = self._measure_updates(step) if self.config.track_updates else None
        grads_finite = finite(total)
        loss_finite = self._loss_finite(loss)
        overflow = self._amp_overflow(grads_finite)
        activations = self.activations.collect() if self.activations is not None else None
        forward = self.origin.collect(self.layout.device) if self.origin is not None else None
        if activations is None and self.activations is not None and self.activations.names:
            self._warn_once(
                "activations-silent",
                "gradwatch: check_activations=True, but no activation module ran (with autograd) "
                "before this step; under torch.compile, create GradWatch before the first "
                "compiled forward (dynamo does not see hooks added later)",
            )
        obs = Observation(
            steps=(step,),
            norms=norms[None],
            totals=total[None],
            valid=(grads_finite & loss_finite)[None],  # an overflow step has non-finite gradients
            has_grad=has_grad,
            weight_norms=self._weight_norms,
            grads_finite=grads_finite[None],
            loss_finite=loss_finite[None],
            overflow=overflow[None],
            update_ratio=update_ratio,
            update_applied=self._previous_applied if update_ratio is not None else None,
            activations=activations,
            forward=forward,
            lr=self._learning_rates(),
            update_rule=self._lrs.rule if self._lrs is not None else None,
        )
        flags: dict[AlertKind, torch.Tensor] = {}
        mail: list[tuple[Detector, Detection]] = []
        for detector, pending in zip(self.detectors, self._pending, strict=True):
            if detector.cadence == "step":
                detection = detector.observe(obs)
                pending.append(detection)  # stacked at the flush: no per-step work
                if detector.severity != "info":
                    mail.append((detector, detection))
                if self._needs_flags:
                    fired = detection.fired.reshape(())
                    previous = flags.get(detector.kind)
                    flags[detector.kind] = fired if previous is None else previous | fired
        if self._needs_flags:
            nonfinite_now = (~grads_finite & ~overflow) | ~loss_finite
            previous = flags.get(AlertKind.NONFINITE)
            flags[AlertKind.NONFINITE] = (
                nonfinite_now if previous is None else previous | nonfinite_now
            )
        if self.config.nonfinite == "raise" and self._host_flags(flags)[AlertKind.NONFINITE]:
            if self._source is not None:
                self._source.arm()  # nothing armed from an earlier step applies to this one
            self.history.write(step, norms, total, None, 1.0)
            self.step_count = step + 1
            record = self.flush()
            if record is not None:
                records += (record,)
            return StepOutcome(StepReport(step=step), records, GradientError(self._error(step)))
        clip_coef, skip, lr_scale = self._apply_remedies(obs, pattern, flags, loss_scale)
        self._lr_scale = lr_scale
        self._previous_applied = ~overflow & (~skip if skip is not None else self._true)
        self.history.write(step, norms, total, clip_coef, lr_scale)
        histogram_every = self.config.histogram_every_n_steps
        if self.histograms is not None and step % histogram_every < self.config.probe_every_n_steps:
            params, grads = probe.grads(pattern)
            self._histogram_rows.append((step, self.histograms.compute(params, grads, sq_norms)))
        self.step_count = step + 1
        self._fingerprint = fingerprint
        report = StepReport(
            step=step,
            skipped=skip if skip is not None else False,
            total_norm=total,
            clip_coef=clip_coef,
            lr_scale=lr_scale if lr_scale is not None else 1.0,
        )
        if flush_due:
            record = self.flush()
        elif self._news(step, mail):  # a warning/error the user has not heard of: tell now
            record = self._flush(early=True)
        else:
            record = None
        if record is not None:
            records += (record,)
        report.alerts = [alert for record in records for alert in record.new_alerts]
        self._last_report = report
        return StepOutcome(report, records)

    def _unprobed(self, step: int) -> StepOutcome:
        """A step between two probes (``probe_every_n_steps``): nothing is measured; the flush
        happens if one is due, with the weight norms of this step."""
        cadence = self.config.log_every_n_steps
        flush_due = (step + 1) // cadence > self.step_count // cadence
        if self.config.track_updates:
            self._measure_updates(step)
        if self.origin is not None:
            self.origin.clear()  # this step's forward is not judged
        if flush_due:
            self._weight_norms = self.probe.weight_sq_norms().sqrt()
        self.step_count = step + 1
        self._fingerprint = None  # the next probe cannot be a repeat of this step
        report = StepReport(step=step)
        record = self.flush() if flush_due else None
        if record is not None:
            report.alerts = list(record.new_alerts)
        return StepOutcome(report, (record,) if record is not None else ())

    def flush(self) -> FlushRecord | None:
        """Materialises everything pending: one host transfer, new alerts; None if nothing is.

        A model that changed since its layers were read is read again after the flush (added
        modules and unfrozen layers are noticed here).
        """
        record = self._flush()
        if record is not None:
            layers = self._changed_layers()
            if layers is not None:
                self._rescan(layers)
        return record

    def _flush(self, early: bool = False) -> FlushRecord | None:
        """The flush; ``early``: out of cadence, for new alerts. An early flush does everything
        a flush does (the book, the history mirror and the flush-cadence detectors see its steps),
        but its record carries only the alerts: its steps go to the sinks with the next regular
        record, so per-layer scalars and window statistics keep the ``log_every_n_steps``
        cadence."""
        history = self.history
        if history.num_pending == 0:
            if early or not self._carry:
                return None
            (weight_norms,) = to_host([self._weight_norms])  # only the steps of an early flush
            rows, self._carry = _Rows.join(self._carry), []
            return self._record(rows, weight_norms, None, [])
        hist_norms, hist_scalars = history.pending()
        steps = np.asarray(history.pending_steps, dtype=np.int64)
        tensors = [hist_norms, hist_scalars, self._weight_norms]
        if self._update_ratio is not None:
            tensors.append(self._update_ratio)
        block = self._flush_observation(steps, hist_norms, hist_scalars[:, 0])
        detection_rows = [
            _stack(
                [detector.observe(block)] if detector.cadence == "flush" else pending,
                self.layout.device,
            )
            for detector, pending in zip(self.detectors, self._pending, strict=True)
        ]
        tensors += detection_rows
        if self._overflow_rows:
            tensors.append(torch.stack(self._overflow_rows))
        tensors += [h for _, h in self._histogram_rows]
        if self._running_stats:
            tensors.append(self._running_stats.nonfinite())
        host = iter(to_host(tensors))
        norms, scalars, weight_norms = next(host), next(host), next(host)
        update_ratio = next(host) if self._update_ratio is not None else None
        detector_rows = [next(host) for _ in detection_rows]
        overflow_rows = next(host) if self._overflow_rows else None
        histograms = [
            (step, name, hist)
            for step, _ in self._histogram_rows
            if self.histograms is not None
            for name, hist in self.histograms.decode(next(host))
        ]
        bad_stats = next(host) if self._running_stats else None
        history.commit(norms, scalars)
        for pending in self._pending:
            pending.clear()
        self._overflow_rows = []
        self._histogram_rows = []

        new_alerts: list[Alert] = []
        if overflow_rows is not None:
            new_alerts += self._overflow_alerts(steps, overflow_rows)
        for detector, det_rows in zip(self.detectors, detector_rows, strict=True):
            new_alerts += self._alerts_from_rows(detector, steps, det_rows)
        if bad_stats is not None and bad_stats.any():
            new_alerts += self._running_stats_alert(int(steps[-1]), bad_stats)
        self._materialised = int(steps[-1])
        rows = _Rows(steps, norms, scalars, histograms)
        if early:
            self._carry.append(rows)
            rows = _Rows.empty(norms.shape[1], scalars.shape[1])
        elif self._carry:
            rows = _Rows.join([*self._carry, rows])
            self._carry = []
        return self._record(rows, weight_norms, update_ratio, new_alerts)

    def _record(
        self,
        rows: _Rows,
        weight_norms: np.ndarray,
        update_ratio: np.ndarray | None,
        new_alerts: list[Alert],
    ) -> FlushRecord:
        return FlushRecord(
            layer_names=self.layer_names,
            steps=rows.steps,
            grad_norms=rows.norms,
            total_norms=rows.scalars[:, 0],
            clip_coefs=rows.scalars[:, 1] if self.clips else None,
            lr_scales=rows.scalars[:, 2] if self.scales_lr else None,
            weight_norms=weight_norms,
            update_ratios=update_ratio,
            histograms=rows.histograms,
            new_alerts=new_alerts,
            alert_counts={k.value: v for k, v in self.book.counts().items()},
        )

    def last_norms(self) -> dict[str, float]:
        """Per-layer L2 gradient norm of the latest flushed step (empty before any)."""
        if not len(self.history.host_steps):
            return {}
        row = self.history.host_norms[-1]
        return {name: float(v) for name, v in zip(self.layer_names, row, strict=True)}

    def history_dict(self) -> dict[str, np.ndarray]:
        """The flushed window: ``"step"`` and one norm array per layer."""
        return self.history.as_dict(self.layer_names)

    def run_before_optimizer_step(self, callback: Callable[[], None] | None) -> None:
        """Calls ``callback`` first thing in every ``optimizer.step()`` (before the remedies'
        decisions are applied there): ``GradWatch.attach``. None stops it."""
        if self._source is None:
            raise ValueError("running before the optimizer step needs the optimizer")
        self._source.before_step = callback

    def close(self) -> None:
        """Removes every hook and restores the optimizer; the engine records nothing more."""
        self._order.remove()
        if self.origin is not None:
            self.origin.remove()
        if self.activations is not None:
            self.activations.remove()
        if self._source is not None:
            self._source.close()
        self._running_stats.remove()
        if self._output_capture is not None:
            self._output_capture.remove()

    def state_dict(self) -> dict[str, Any]:
        """Plain-value state (flush first): step counter, history, alerts, statistics."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": self.step_count,
            "layer_names": self.layer_names,
            "alerts": self.book.state_dict(),
            "history": self.history.state_dict(),
            "detectors": [[type(d).__name__, d.state_dict()] for d in self.detectors],
            "remedies": [[type(r).__name__, r.state_dict()] for r in self.remedies],
        }
        if self.activations is not None:
            state["activations"] = self.activations.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the step counter, history and statistics continue.

        Raises:
            ValueError: ``state`` is not a gradwatch state, or comes from a model with other layers
                (nothing is restored then).
        """
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError(f"not a GradWatch state_dict: {type(state).__name__}")
        if self._order.active:
            self._finish_forward_order()
        saved_layers = list(state.get("layer_names", []))
        if sorted(saved_layers) != sorted(self.layer_names):
            raise ValueError(
                "the saved state belongs to a model with other layers "
                f"({len(saved_layers)} saved, {self.layout.num_layers} here); nothing restored"
            )
        if saved_layers != self.layer_names:  # same layers, other forward order: adopt it
            position = {name: i for i, name in enumerate(self.layer_names)}
            self._relayout([self.layout.layers[position[name]] for name in saved_layers])
        self.step_count = state["step"]
        self.book.load_state_dict(state.get("alerts", {}))
        self._seen = {}
        if self._mailbox is not None:
            self._mailbox.clear()
        if "history" in state:
            self.history.load_state_dict(state["history"])
        if self.activations is not None and "activations" in state:
            self.activations.load_state_dict(state["activations"])
        for part, objects in (("detectors", self.detectors), ("remedies", self.remedies)):
            saved = state.get(part, [])
            if [name for name, _ in saved] != [type(obj).__name__ for obj in objects]:
                self._warn_once(
                    f"state-{part}",
                    f"GradWatch.load_state_dict: the saved {part} differ from this watch's; "
                    "their statistics start afresh",
                )
                continue
            for obj, (_, sub) in zip(objects, saved, strict=True):
                obj.load_state_dict(sub)

    # ------------------------------------------------------------------ layout

    def _bind(self) -> None:
        every = self.config.probe_every_n_steps
        for detector in self.detectors:
            detector.bind(self.layout, probe_every_n_steps=every)
        for remedy in self.remedies:
            remedy.bind(self.layout, probe_every_n_steps=every)
        for detector in self.detectors:
            if detector.needs is not None and not getattr(self.config, detector.needs):
                self._warn_once(
                    f"needs-{detector.needs}",
                    f"gradwatch: {type(detector).__name__} needs GradWatch(..., "
                    f"{detector.needs}=True); it stays quiet",
                )

    def _finish_forward_order(self) -> None:
        """Puts the layers in the order they first ran (before any step)."""
        layers = self.layout.layers
        order = [layers[i] for i in forward_permutation(len(layers), self._order.finish())]
        if order != list(layers):
            self._relayout(order)

    def _current_structure(self, layers: list[Layer]) -> Structure:
        activations = (
            [m for _, m in activation_modules(self.model)] if self.activations is not None else []
        )
        return Structure.of(layers, activations)

    def _changed_layers(self) -> list[Layer] | None:
        """The model's layers now (``include``/``exclude`` applied) if the model changed since
        they were read, else None."""
        layers, _ = select_layers(
            find_layers(self.model, self._params), *self.config.layer_patterns
        )
        if self._current_structure(layers) == self._structure:
            return None
        return layers

    def _rescan(self, layers: list[Layer]) -> None:
        """Watches the layers of a model that changed (flush first: pending steps are not kept).

        Layers keep their forward position by name (a new one goes after the layer registered
        before it); the step counter, history (by layer name), alerts and dead-unit counters
        carry over; detector and remedy statistics start afresh.
        """
        structure = self._current_structure(layers)
        added, removed, changed = self._structure.layer_changes(structure)
        self._structure = structure
        if not layers:
            self._warn_once(
                "model-empty",
                "gradwatch: the model has no trainable parameters to watch any more; the watch "
                "keeps its previous layers",
            )
            return
        self._warn_once(
            "model-changed",
            f"gradwatch: the model changed after GradWatch was built (layers added: "
            f"{_few(added)}; removed: {_few(removed)}; changed: {_few(changed)}); its layers "
            "were read again: the step counter, history and alerts carry over, detector and "
            "remedy statistics start afresh",
        )
        activation_names = self.layout.activation_names
        if self.activations is not None:
            saved = self.activations.state_dict()
            self.activations.remove()
            self.activations = ActivationMonitor(self.model)
            self.activations.load_state_dict(saved)
            activation_names = tuple(self.activations.names)
        if self.origin is not None:
            self.origin.remove()
        self.origin = self._origin_tracer()
        self.profile = ModelProfile.inspect(  # the initialisation as measured at the start
            self.model,
            self.optimizer,
            remedies=self.remedies,
            scaler=self.scaler,
            initial=self.profile,
        )
        self._registration = list(self.model.parameters())
        self._relayout(merge_order(self.layout.names, layers), activation_names)
        self._rescan_remedy_parts()

    def _origin_tracer(self) -> OriginTracer | None:
        """The forward checks behind the NaN origin, when a non-finite detector reads them."""
        if not any(isinstance(detector, NonFiniteDetector) for detector in self.detectors):
            return None
        return OriginTracer(self.model, modules=self.config.check_activations)

    def _module_names(self) -> list[str]:
        return self.origin.names if self.origin is not None else []

    def _rescan_remedy_parts(self) -> None:
        """What the remedies need of a model that changed: where they act (the parameters may
        have moved or changed dtype), its normalisation layers, its output layer."""
        try:
            self.fused = self._fused_path()
        except ValueError as error:  # fused=True, and the changed model no longer allows it
            self.fused = False
            self._warn_once("fused-lost", f"gradwatch: {error}; the remedies act explicitly")
        self._running_stats.remove()
        self._running_stats = RunningStats(self.model, restore=any(r.skips for r in self.remedies))
        self._output_params = None  # found again (from the last Linear-like layer to run)

    def _relayout(
        self, layers: list[Layer], activation_names: tuple[str, ...] | None = None
    ) -> None:
        """Rebuilds everything that depends on the layers (their statistics start afresh); the
        flushed history carries over by layer name."""
        previous = {name: index for index, name in enumerate(self.layout.names)}
        if activation_names is None:
            activation_names = self.layout.activation_names
        self.layout = Layout.build(layers, activation_names, self._module_names())
        device = self.layout.device
        self.probe = GradientProbe(layers, device, self._registration)
        self.history = self.history.remapped([previous.get(layer.name) for layer in layers], device)
        if self.histograms is not None:
            self.histograms = GradientHistograms(self.layout)
        self._true, self._false = self._true.to(device), self._false.to(device)
        self._overflow_run = self._overflow_run.to(device)
        self._previous_applied = self._previous_applied.to(device)
        self._weight_norms = torch.zeros(len(layers), device=device)
        self._weights_stale = True
        self._update_ratio = None
        self._snapshot = None
        self._mailbox = Mailbox(device) if Mailbox.supports(device) else None
        self._carry = []  # rows of an early flush in the old layout (a regular flush came first)
        if self.optimizer is not None:
            self._lrs = LearningRates(self.optimizer, self.layout)
        self._lr_scale = None
        self._bind()

    # ------------------------------------------------------------------ the step

    def _step_number(self, global_step: int | None) -> int:
        if global_step is None:
            return self.step_count
        if isinstance(global_step, bool) or not isinstance(global_step, int):
            self._warn_once(
                "global-step",
                f"gradwatch: global_step must be an int, got {global_step!r}; ignored",
            )
            return self.step_count
        if not 0 <= global_step <= _MAX_STEP:
            self._warn_once(
                "global-step", f"gradwatch: global_step {global_step} is out of range; ignored"
            )
            return self.step_count
        return global_step

    def _learning_rates(self) -> torch.Tensor | None:
        """``[L]`` learning rates of the coming update: the optimizer's, times the scale the LR
        remedies applied at the previous step (their scale for this step is decided after the
        detectors); None without an optimizer."""
        if self._lrs is None:
            return None
        rates = self._lrs.read()
        return rates if self._lr_scale is None else rates * self._lr_scale

    def _loss_finite(self, loss: Any) -> torch.Tensor:
        if loss is None:
            return self._true
        try:
            # a Python float is a float64 value (torch would make it float32: 1e300 -> inf)
            dtype = torch.float64 if isinstance(loss, float) else None
            value = torch.as_tensor(loss, dtype=dtype).detach()
            if value.device.type == "meta" or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"not a real number with a value: {value.dtype} on {value.device}")
            return finite(value.sum()).to(self.layout.device)  # in its own dtype: 1e300 is finite
        except Exception as error:
            self._warn_once(
                "loss", f"gradwatch: the loss passed to step() is not usable ({error!r}); ignored"
            )
            return self._true

    def _amp_overflow(self, grads_finite: torch.Tensor) -> torch.Tensor:
        """Whether this step is an AMP overflow step the scaler will skip (not yet persistent)."""
        scaler = self.scaler
        if scaler is None or not _scaler_enabled(scaler):
            return self._false
        raw = ~grads_finite
        self._overflow_run = torch.where(raw, self._overflow_run + 1, 0.0)
        persistent = self._overflow_run >= AMP_PERSISTENT_STEPS
        scale = getattr(scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            persistent = persistent | (scale.to(self.layout.device).reshape(()) < 1.0)
        overflow = raw & ~persistent
        self._overflow_rows.append(torch.stack([overflow.float(), self._overflow_run]))
        return overflow

    def _measure_updates(self, step: int) -> torch.Tensor | None:
        """Exact ``||Δw|| / ||w||`` per layer over the update between the previous and this step."""
        probe = self.probe
        ratio = None
        with torch.no_grad():
            current = [distributed.local_part(p.detach()) for p in probe.params]
            if self._snapshot is not None:
                deltas = torch._foreach_sub(current, self._snapshot)
                sq = probe.reduce_tensors(list(deltas))
                weight_sq = probe.weight_sq_norms()
                ratio = sq.sqrt() / weight_sq.sqrt().clamp_min(1e-12)
                self._update_ratio = ratio
                self._snapshot = None
            cadence = self.config.log_every_n_steps
            if (step + 2) % cadence == 0 or cadence == 1:
                self._snapshot = [t.clone() for t in current]
        return ratio

    def _host_flags(self, flags: dict[AlertKind, torch.Tensor]) -> dict[AlertKind, bool]:
        """This step's flags on the host, OR-ed over ranks (one small collective and transfer)."""
        kinds = list(flags)
        stacked = torch.stack([flags[k] for k in kinds]).float()
        values = to_host([distributed.all_reduce_max_(stacked)])[0]
        return {kind: bool(value) for kind, value in zip(kinds, values, strict=True)}

    def _fused_path(self) -> bool:
        """Whether clipping and skipping act inside the optimizer's kernel (``fused=``)."""
        wanted = self.config.fused
        if wanted is False:
            return False
        if self.optimizer is None:
            if wanted:
                raise ValueError("fused=True needs the optimizer: GradWatch(model, optimizer)")
            return False
        blocker = fused_blocker(self.optimizer, self.layout.params)
        if wanted and blocker is not None:
            raise ValueError(f"fused=True, but remedies cannot act inside the kernel: {blocker}")
        return blocker is None

    def _apply_remedies(
        self,
        obs: Observation,
        pattern: tuple[int, ...],
        flags: dict[AlertKind, torch.Tensor],
        loss_scale: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | float | None]:
        """Asks every remedy in order and applies (or arms) their decisions.

        Global clipping coefficients multiply into one, applied last: by the fused kernel
        (``grad_scale``) or by one pass over the gradients (:func:`clip_`). AGC's per-tensor factors
        are multiplied in where it stands. Skip flags and LR scales are armed for the optimizer
        step. Returns the clip coefficient, the skip flag and the LR scale (device tensors).
        """
        source = self._source
        if not self.remedies:
            return None, None, None
        if distributed.is_distributed() and any(r.skips or r.scales_lr for r in self.remedies):
            flags = self._flags_of_all_ranks(flags)
        state = _RemedyPass(self.probe, pattern, obs.totals[0], loss_scale)
        clip_coef: torch.Tensor | None = None
        skip: torch.Tensor | None = None
        lr_scale: torch.Tensor | float | None = None
        for remedy in list(self.remedies):
            view = RemedyInput(
                obs,
                flags,
                state.total_now,
                state.grads,
                state.factor(),
                state.tensor_sq_norms,
                state.total_norm,
                self._output_layer_params() if remedy.needs_output_layer else frozenset(),
            )
            try:
                decision = remedy.decide(view)
            except Exception as error:  # one broken remedy never stops the others
                self.remedies.remove(remedy)
                self._warn_once(
                    f"remedy-{id(remedy)}",
                    f"gradwatch: remedy {type(remedy).__name__} failed ({error!r}); it is "
                    "disabled and the other remedies go on",
                )
                continue
            if decision.tensor_coefs:
                ratio = state.multiply(decision.tensor_coefs, decision.tensor_sq_norms)
                clip_coef = ratio if clip_coef is None else clip_coef * ratio
            if decision.clip_coef is not None:
                coef = decision.clip_coef
                state.clip(coef)
                clip_coef = coef if clip_coef is None else clip_coef * coef
            if decision.skip is not None:
                flag = torch.as_tensor(decision.skip, device=self.layout.device).to(torch.bool)
                skip = flag if skip is None else skip | flag
            if decision.lr_scale is not None:
                factor = decision.lr_scale
                lr_scale = factor if lr_scale is None else lr_scale * factor
        divisor = None
        if state.pending is not None:
            if self.fused:
                divisor = clip_divisor(state.pending)
            else:
                clip_(state.grads()[1], state.pending)
        if source is not None:
            source.arm(divisor=divisor, skip=skip, fused=self.fused, lr_scale=lr_scale)
        elif skip is not None and self.optimizer is not None and bool(skip):  # no step hooks
            drop_gradients(optimizer_params(self.optimizer))
        if skip is not None:
            self._running_stats.restore_where(skip)
        return clip_coef, skip, lr_scale

    def _flags_of_all_ranks(
        self, flags: dict[AlertKind, torch.Tensor]
    ) -> dict[AlertKind, torch.Tensor]:
        """This step's flags OR-ed over ranks (one small collective, on the device)."""
        kinds = list(flags)
        if not kinds:
            return flags
        stacked = distributed.all_reduce_max_(torch.stack([flags[k] for k in kinds]).float())
        return {kind: stacked[index] > 0 for index, kind in enumerate(kinds)}

    def _output_layer_params(self) -> frozenset[int]:
        """Parameters of the output layer(s), found once (see ``output_layer``)."""
        if self._output_params is None:
            capture = self._output_capture
            roots = capture.take() if capture is not None else []
            layers = list(self.layout.layers)
            found = output_layers(roots, layers)
            self._output_params = frozenset(id(p) for i in found for p in layers[i].params)
        return self._output_params

    def _running_stats_alert(self, step: int, bad: np.ndarray) -> list[Alert]:
        names = tuple(n for n, b in zip(self._running_stats.names, bad, strict=True) if b > 0.5)
        restores = any(r.skips for r in self.remedies)
        alert = Alert(
            kind=AlertKind.NONFINITE_BUFFERS,
            step=step,
            layers=names,
            value=float(len(names)),
            threshold=0.0,
            severity="error",
            message=(
                f"the running statistics of {len(names)} normalisation layer(s) are NaN/Inf: "
                "a forward pass poisoned them, and evaluation (model.eval()) will output NaN"
            ),
            advice=(
                (
                    "skip poisoned steps with gw.SkipStep(): it also restores these statistics"
                    if not restores
                    else "add the detection that saw the poisoned step to gw.SkipStep(on=...)"
                ),
                "reload the running statistics from a checkpoint or recompute them on clean "
                "batches (torch.optim.swa_utils.update_bn)",
                "look for NaN/Inf in the input batches",
            ),
        )
        recorded = self.book.record(alert, step, 1)
        return [recorded] if recorded is not None else []

    def _grad_fingerprint(
        self, pattern: tuple[int, ...]
    ) -> list[tuple[weakref.ref[torch.Tensor], int]]:
        """A few gradients (weakly referenced) and their versions: unchanged means no backward."""
        params = self.probe.params
        present = [i for i in (0, len(params) // 2, len(params) - 1) if pattern[i]]
        grads = [params[i].grad for i in present]
        return [(weakref.ref(g), g._version) for g in grads if g is not None]

    def _error(self, step: int) -> Alert:
        for alert in reversed(self.book.alerts):
            if alert.kind is AlertKind.NONFINITE:
                return alert
        return Alert(
            AlertKind.NONFINITE,
            step,
            (),
            float("nan"),
            0.0,
            "error",
            "a gradient or the loss is NaN/Inf",
            advise(AlertKind.NONFINITE, self.profile),
        )

    # ------------------------------------------------------------------ the flush

    def _flush_observation(
        self, steps: np.ndarray, norms: torch.Tensor, totals: torch.Tensor
    ) -> Observation:
        """The pending steps as one block, for flush-cadence detectors."""
        valid = torch.isfinite(totals)
        return Observation(
            steps=tuple(int(s) for s in steps),
            norms=norms,
            totals=totals,
            valid=valid,
            has_grad=torch.ones(norms.shape[1], dtype=torch.bool, device=norms.device),
            weight_norms=self._weight_norms,
            grads_finite=valid,
            loss_finite=torch.ones_like(valid),
            overflow=torch.zeros_like(valid),
            lr=self._learning_rates(),
            update_rule=self._lrs.rule if self._lrs is not None else None,
        )

    def _alerts_from_rows(
        self, detector: Detector, steps: np.ndarray, rows: np.ndarray
    ) -> list[Alert]:
        """The new alerts among one detector's rows: each detection, in step order, either
        continues its episode or is news (:class:`~gradwatch.engine.alerts.AlertBook`)."""
        fired = np.flatnonzero(rows[:, 0] > 0.5) if len(rows) else np.zeros(0, dtype=np.int64)
        kind = detector.kind
        names = detector.candidate_names() if len(fired) else []
        new: list[Alert] = []
        for index in fired:
            step, value = int(steps[index]), float(rows[index, 1])
            layers = _named(names, rows[index, 2:])
            if self.book.continues(kind, step, value, layers):
                self.book.extend(kind, step, value, layers)
                continue
            alert = Alert(
                kind=kind,
                step=step,
                layers=layers,
                value=value,
                threshold=float(detector.threshold),
                severity=detector.severity,
                message=detector.message(value, layers),
                advice=advise(
                    kind,
                    self.profile,
                    layers=layers,
                    value=value,
                    earlier=[a for a in self.book.alerts if a.step <= step],
                    zero_gradients=self._zero_gradient_layers(len(steps)),
                ),
            )
            self.book.record(alert)
            new.append(alert)
        return new

    def _news(self, step: int, mail: list[tuple[Detector, Detection]]) -> bool:
        """Posts this step's warning/error detections (fired flags and values) to the mailbox
        and reads the rows that have reached the host: whether one holds a detection that would
        be a new alert (no open episode, cleared, or escalated).

        Healthy steps cost one concatenation and a non-blocking copy; the host reads numpy views
        of host memory (no sync). The layers are not mailed: a condition that only moves to other
        layers within its episode is announced at the next regular flush. Unsupported devices and
        no detections: False.
        """
        mailbox = self._mailbox
        if mailbox is None or not mail:
            return False
        parts = [detection.fired for _, detection in mail]
        parts += [detection.value for _, detection in mail]
        if not all(part.shape == (1,) for part in parts):  # 0-d answers are allowed too
            parts = [part.reshape(1) for part in parts]
        mailbox.post(step, torch.cat(parts))  # flags (as 0/1), then values
        count = len(mail)
        news = False
        for posted, row in mailbox.collect():
            if posted <= self._materialised:
                continue  # a flush has put it in the book already
            for index, (detector, _) in enumerate(mail):
                if row[index] > 0.5:
                    kind, value = detector.kind, float(row[count + index])
                    seen = self._seen.get(kind)
                    news = news or not self.book.continues(kind, posted, value, (), seen)
                    self._seen[kind] = posted if seen is None else max(seen, posted)
        return news

    def _zero_gradient_layers(self, steps: int) -> set[str]:
        """Layers whose gradient norm was exactly zero at each of the last ``steps`` steps."""
        norms = self.history.host_norms[-max(steps, 1) :]
        if not len(norms):
            return set()
        zero = ~np.any(norms != 0.0, axis=0)  # NaN is not zero
        return {name for name, z in zip(self.layer_names, zero, strict=True) if z}

    def _overflow_alerts(self, steps: np.ndarray, rows: np.ndarray) -> list[Alert]:
        fired = np.flatnonzero(rows[:, 0] > 0.5)
        if not len(fired):
            return []
        first = fired[0]
        alert = Alert(
            kind=AlertKind.AMP_OVERFLOW,
            step=int(steps[first]),
            layers=(),
            value=float(len(fired)),
            threshold=0.0,
            severity="info",
            message=(
                f"{len(fired)} AMP overflow step(s) from step {int(steps[first])}: the GradScaler "
                "skipped them and lowered its scale (expected occasionally)"
            ),
        )
        recorded = self.book.record(alert, int(steps[fired[-1]]), len(fired))
        return [recorded] if recorded is not None else []


def _select(
    model: nn.Module, layers: list[Layer], config: WatchConfig
) -> tuple[list[Layer], list[str]]:
    """The layers ``include``/``exclude`` keep, and the patterns that matched none.

    Raises:
        ValueError: They keep no layer.
    """
    selected, unused = select_layers(layers, *config.layer_patterns)
    if not selected:
        names = format_layers([layer.name for layer in layers])
        raise ValueError(
            f"include={config.include!r} and exclude={config.exclude!r} leave none of the "
            f"{len(layers)} layers of {type(model).__name__} to watch (layers: {names})"
        )
    return selected, unused


def _stack(detections: list[Detection], device: torch.device) -> torch.Tensor:
    """Stacks detections into ``[k, 2 + C]`` rows: fired, value, then the scores."""
    if not detections:
        return torch.zeros(0, 2, device=device)
    k = len(detections)
    with_scores = all(d.scores is not None for d in detections)
    shapes = {(d.fired.shape, d.value.shape, _shape(d.scores)) for d in detections}
    if len(shapes) == 1 and detections[0].fired.numel() == 1:  # one step each: stack columns
        columns = [
            torch.stack([d.fired for d in detections]).reshape(k, 1).float(),
            torch.stack([d.value for d in detections]).reshape(k, 1).float(),
        ]
        if with_scores:
            scores = torch.stack([d.scores for d in detections])  # type: ignore[misc]
            columns.append(scores.reshape(k, -1).float())
    else:  # blocks of several steps
        fired = torch.cat([d.fired.reshape(-1) for d in detections]).float()[:, None]
        value = torch.cat([d.value.reshape(-1) for d in detections]).float()[:, None]
        columns = [fired, value]
        if with_scores:
            scores = torch.cat([d.scores for d in detections if d.scores is not None])
            columns.append(scores.float().reshape(fired.shape[0], -1))
    return torch.cat(columns, dim=1)


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


def _named(names: list[str], scores: np.ndarray) -> tuple[str, ...]:
    """The names with a positive score, highest first."""
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] > 0]
    return tuple(names[i] for i in order if i < len(names))


@dataclass(frozen=True)
class _Rows:
    """The per-step host rows of a flush: steps ``[k]``, norms ``[k, L]``, scalars ``[k, 3]``
    and the histograms taken."""

    steps: np.ndarray
    norms: np.ndarray
    scalars: np.ndarray
    histograms: list[tuple[int, str, dict[str, Any]]]

    @classmethod
    def empty(cls, num_layers: int, num_scalars: int) -> _Rows:
        """No step."""
        return cls(
            np.zeros(0, dtype=np.int64),
            np.zeros((0, num_layers), dtype=np.float32),
            np.zeros((0, num_scalars), dtype=np.float32),
            [],
        )

    @classmethod
    def join(cls, parts: list[_Rows]) -> _Rows:
        """The rows of ``parts`` one after the other."""
        return cls(
            np.concatenate([p.steps for p in parts]),
            np.concatenate([p.norms for p in parts]),
            np.concatenate([p.scalars for p in parts]),
            [h for p in parts for h in p.histograms],
        )


def _same(
    a: list[tuple[weakref.ref[torch.Tensor], int]] | None,
    b: list[tuple[weakref.ref[torch.Tensor], int]],
) -> bool:
    if a is None or len(a) != len(b) or not b:
        return False
    return all(
        ra() is not None and ra() is rb() and va == vb
        for (ra, va), (rb, vb) in zip(a, b, strict=True)
    )


def _few(names: list[str]) -> str:
    """Up to three names, quoted, and how many more."""
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:3])
    return shown + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _scaler_enabled(scaler: Any) -> bool:
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


class _RemedyPass:
    """What the remedies of one step have done so far (see ``Engine._apply_remedies``).

    Global clipping is kept ``pending`` (applied last, once); per-tensor factors are multiplied in
    at once and the per-tensor norms they report replace the probe's.
    """

    def __init__(
        self,
        probe: GradientProbe,
        pattern: tuple[int, ...],
        total: torch.Tensor,
        loss_scale: torch.Tensor | None,
    ) -> None:
        self.probe = probe
        self.pattern = pattern
        self.total_now = total
        self.loss_scale = loss_scale
        self.pending: torch.Tensor | None = None
        self._tensor_sq: torch.Tensor | None = None  # None: the probe's (gradients unchanged)

    def grads(self) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """The parameters with a gradient and their (local) gradients."""
        return self.probe.grads(self.pattern)

    def factor(self) -> torch.Tensor | None:
        """Stored gradients times this are the gradients the next remedy reasons about."""
        factor = self.pending
        if self.loss_scale is not None:
            inverse = 1.0 / self.loss_scale.to(self.total_now.device)
            factor = inverse if factor is None else factor * inverse
        return factor

    def tensor_sq_norms(self) -> torch.Tensor:
        """``[P]`` squared norms of the stored gradients."""
        if self._tensor_sq is not None:
            return self._tensor_sq
        return self.probe.tensor_sq_norms(self.pattern)

    def total_norm(self, norm_type: float) -> torch.Tensor:
        """The total norm of the gradients the next remedy reasons about, as clip_grad_norm_."""
        if norm_type == 2.0 and self._tensor_sq is not None:
            total = self._tensor_sq.sum().sqrt()
        else:
            total = self.probe.total_norm(self.pattern, norm_type)
        factor = self.factor()
        return total if factor is None else total * factor.abs().to(total.device)

    def clip(self, coef: torch.Tensor) -> None:
        """A global coefficient: pending until the end."""
        self.pending = coef if self.pending is None else self.pending * coef
        self.total_now = self.total_now * coef

    def multiply(
        self, tensor_coefs: list[tuple[torch.Tensor, torch.Tensor]], sq_after: torch.Tensor | None
    ) -> torch.Tensor:
        """Multiplies per-tensor factors in; returns the ratio of total norms after/before."""
        with torch.no_grad():
            for grad, coef in tensor_coefs:
                grad.mul_(coef)
        if sq_after is None or self.probe.sharded:  # measure again (all-reduced when sharded)
            sq, _ = self.probe.grad_sq_norms(self.pattern)
            self._tensor_sq = None
        else:
            sq = sq_after
            self._tensor_sq = sq_after
        stored = sq.sum().sqrt()
        factor = self.factor()
        after = stored if factor is None else stored * factor.abs()
        ratio = torch.where(self.total_now > 0, after / self.total_now, 1.0)
        self.total_now = after
        return ratio
