"""``GradWatch``: the plain-PyTorch frontend that drives the engine once per optimizer step."""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch import distributed
from gradwatch.advice import advise
from gradwatch.alerts import Alert, AlertBook, AlertKind, GradientError
from gradwatch.detectors import Detector
from gradwatch.history import NormHistory
from gradwatch.layers import ForwardOrder, Layer, find_layers, forward_permutation, unwrap
from gradwatch.probe import GradientProbe
from gradwatch.record import FlushRecord
from gradwatch.remedies import Remedy
from gradwatch.sinks.base import Sink
from gradwatch.step import Detection, StepObservation, StepReport, WatchContext, finite
from gradwatch.transfer import to_host
from gradwatch.validation import check_int

_NONFINITE_POLICIES = ("warn", "raise")
# Consecutive AMP overflow steps after which overflow counts as a real non-finite gradient even if
# the scaler's scale is still >= 1 (the scale test below usually triggers first).
_AMP_PERSISTENT_STEPS = 64


class GradWatch:
    """Watches per-layer gradient norms of ``model`` at every optimizer step.

    Call :meth:`step` after ``loss.backward()`` (and ``scaler.unscale_``) and before
    ``optimizer.step()``, or :meth:`attach` to run it automatically before each optimizer step.
    Nothing leaves the device between flushes; every ``log_every_n_steps`` steps one packed tensor
    is copied to the host, alerts materialise and sinks are written.

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
        optimizer: Its optimizer; required by :meth:`attach` and by remedies that act on it.
        logdir: TensorBoard run directory (created; rank 0 only).
        writer: An existing ``SummaryWriter`` (or an object with its ``add_*`` methods) instead.
        log_every_n_steps: Flush cadence (host transfer, alerts, per-layer scalars); >= 1.
        histogram_every_n_steps: Gradient histogram cadence; 0 disables histograms.
        detectors: ``"default"`` (vanishing, exploding, spike, non-finite), a sequence of detector
            objects, or ``()`` for none.
        remedies: Remedy objects, applied in order.
        scaler: The ``torch.amp.GradScaler``, so AMP overflow steps are recognised.
        check_activations: Forward hooks for saturation, dead units and the first non-finite output.
        track_updates: Measure the per-layer update/weight ratio on flush steps.
        on_alert: Called with each new alert, on the host.
        nonfinite: ``"warn"`` (alert) or ``"raise"`` (:class:`GradientError` from :meth:`step`;
            reads one flag per step).
        window: Steps of history kept (at least ``log_every_n_steps``).
        sinks: Extra sinks (e.g. a framework logger adapter), written at every flush on rank 0.
        params: Watch only these parameters of ``model`` (e.g. one optimizer's); default every
            trainable parameter.
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
        sinks: Sequence[Sink] = (),
        params: Iterable[nn.Parameter] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        check_int("histogram_every_n_steps", histogram_every_n_steps, minimum=0)
        check_int("window", window, minimum=1)
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert must be callable or None, got {on_alert!r}")
        if logdir is not None and writer is not None:
            raise ValueError("pass either logdir or writer, not both")
        self.model = unwrap(model)
        self.optimizer = optimizer
        self.scaler = scaler
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.nonfinite = nonfinite
        self.window = max(window, log_every_n_steps)
        self.check_activations = check_activations
        self.track_updates = track_updates
        self.detectors = _resolve_detectors(detectors, check_activations, track_updates)
        self.remedies = _resolve_remedies(remedies, optimizer)
        for name, sink in enumerate(sinks):
            if not isinstance(sink, Sink):
                raise TypeError(f"sinks[{name}] must be a gradwatch Sink, got {sink!r}")

        self._layers: list[Layer] = find_layers(self.model, params)
        if not self._layers:
            raise ValueError(
                f"model has no trainable parameters to watch: {type(self.model).__name__} "
                "(every parameter has requires_grad=False)"
            )
        self._book = AlertBook(on_alert)
        self._sinks: list[Sink] = list(sinks) if distributed.is_rank_zero() else []
        if distributed.is_rank_zero() and (logdir is not None or writer is not None):
            from gradwatch.sinks.tensorboard import TensorBoardSink

            self._sinks.append(TensorBoardSink(logdir=logdir, writer=writer))
        self._order = ForwardOrder(self.model, self._layers, self._on_forward_order)
        self._activations: Any = None
        if check_activations:
            from gradwatch.activations import ActivationMonitor

            self._activations = ActivationMonitor(self.model)
        self._context: WatchContext | None = None
        self._step = 0
        self._pending_state: dict[str, Any] | None = None
        self._attach_handle: RemovableHandle | None = None
        self._last_report: StepReport | None = None
        self._fingerprint: list[tuple[weakref.ref, int]] | None = None
        self._warned: set[str] = set()
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def layer_names(self) -> list[str]:
        """Layers in forward execution order (registration order before the first forward)."""
        return [layer.name for layer in self._layers]

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first."""
        return list(self._book.alerts)

    @property
    def step_count(self) -> int:
        """Number of steps recorded so far (the next step's number)."""
        return self._step

    def step(
        self, loss: torch.Tensor | float | None = None, *, global_step: int | None = None
    ) -> StepReport:
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
        if self._closed:
            self._warn_once("closed", "GradWatch.step() called after close(); ignored")
            return StepReport(step=self._step)
        try:
            return self._record_step(loss, global_step)
        except GradientError:
            raise
        except Exception as error:  # the training loop comes first
            self._warn_once(f"step:{type(error).__name__}", f"gradwatch step failed: {error!r}")
            return StepReport(step=self._step)

    def attach(self) -> GradWatch:
        """Runs :meth:`step` automatically before every ``optimizer.step()``; returns ``self``."""
        if self.optimizer is None:
            raise ValueError("attach() needs the optimizer: GradWatch(model, optimizer)")
        if self._attach_handle is None:
            self._attach_handle = self.optimizer.register_step_pre_hook(self._before_optimizer_step)
        return self

    def detach(self) -> None:
        """Removes every hook gradwatch installed (attach, forward order, activations, remedies)."""
        if self._attach_handle is not None:
            self._attach_handle.remove()
            self._attach_handle = None
        self._order.remove()
        if self._activations is not None:
            self._activations.remove()
        for remedy in self.remedies:
            remedy.detach()

    def flush(self) -> list[Alert]:
        """Materialises everything pending: one host transfer, new alerts, sink writes."""
        try:
            return self._flush()
        except Exception as error:
            self._warn_once("flush", f"gradwatch flush failed: {error!r}")
            return []

    def close(self) -> None:
        """Flushes, closes the sinks and removes every hook. Safe to call twice."""
        if self._closed:
            return
        self.flush()
        self.detach()
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as error:
                self._warn_once("sink-close", f"gradwatch sink {sink!r} failed to close: {error!r}")
        self._sinks = []
        self._closed = True

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def last_norms(self) -> dict[str, float]:
        """Per-layer L2 gradient norm of the latest step (flushes pending steps)."""
        self.flush()
        if self._context is None or not len(self._history.host_steps):
            return {}
        row = self._history.host_norms[-1]
        return {name: float(v) for name, v in zip(self.layer_names, row, strict=True)}

    def history(self) -> dict[str, np.ndarray]:
        """The retained window: ``"step"`` and one norm array per layer (flushes pending steps)."""
        self.flush()
        if self._context is None:
            return {
                "step": np.zeros(0, dtype=np.int64),
                **{n: np.zeros(0) for n in self.layer_names},
            }
        return self._history.as_dict(self.layer_names)

    def summary(self) -> str:
        """A human-readable diagnosis: worst layers, alerts and advice."""
        from gradwatch.summary import format_summary

        self.flush()
        return format_summary(self)

    def state_dict(self) -> dict[str, Any]:
        """Plain-value state (safe for ``torch.load(weights_only=True)``), flushed first."""
        self.flush()
        state: dict[str, Any] = {
            "version": 1,
            "step": self._step,
            "layer_names": self.layer_names,
            "alerts": self._book.state_dict(),
        }
        if self._context is not None:
            state["history"] = self._history.state_dict()
            state["detectors"] = [[type(d).__name__, d.state_dict()] for d in self.detectors]
            state["remedies"] = [[type(r).__name__, r.state_dict()] for r in self.remedies]
        elif self._pending_state is not None:
            return dict(self._pending_state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the step counter, history and statistics continue."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"not a GradWatch state_dict: {type(state).__name__}")
        self._step = int(state["step"])
        self._book.load_state_dict(state.get("alerts", {}))
        if self._context is None:
            self._pending_state = state
        else:
            self._load_engine_state(state)

    # ------------------------------------------------------------------ the step

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step()

    def _on_forward_order(self, ran: list[int]) -> None:
        if self._context is None:
            self._layers = [self._layers[i] for i in forward_permutation(len(self._layers), ran)]

    def _build_context(self) -> WatchContext:
        if self._order.active:  # the root never finished a forward: keep what ran so far
            self._on_forward_order(list(self._order._order))
            self._order.remove()
        device = distributed.local_part(self._layers[0].params[0]).device
        probe = GradientProbe(self._layers, device)
        numels = torch.tensor([layer.numel for layer in self._layers], dtype=torch.float32)
        context = WatchContext(
            model=self.model,
            optimizer=self.optimizer,
            scaler=self.scaler,
            layers=self._layers,
            device=device,
            numels=numels.to(device),
            probe=probe,
            activations=self._activations,
            remedies=tuple(self.remedies),
        )
        self._history = NormHistory(self.window, len(self._layers), device)
        self._rows: list[list[Detection]] = [[] for _ in self.detectors]
        self._overflow_rows: list[torch.Tensor] = []
        self._overflow_run = torch.zeros((), device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self._false = ~self._true
        self._weight_norms = probe.weight_sq_norms().sqrt()
        self._update_ratio: torch.Tensor | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._histogram_rows: list[tuple[int, torch.Tensor]] = []
        self._histograms: Any = None
        if self.histogram_every_n_steps:
            from gradwatch.histograms import GradientHistograms

            self._histograms = GradientHistograms(context)
        for detector in self.detectors:
            detector.bind(context)
        for remedy in self.remedies:
            remedy.bind(context)
        self._context = context
        if self._pending_state is not None:
            self._load_engine_state(self._pending_state)
            self._pending_state = None
        return context

    def _record_step(
        self, loss: torch.Tensor | float | None, global_step: int | None = None
    ) -> StepReport:
        context = self._context or self._build_context()
        probe = context.probe
        pattern = probe.grad_pattern()
        if not any(pattern):
            self._warn_once(
                "no-grad", "GradWatch.step() found no gradients: call it after loss.backward()"
            )
            return StepReport(step=self._step)
        fingerprint = self._grad_fingerprint(pattern)
        if self._same_gradients(self._fingerprint, fingerprint) and self._last_report is not None:
            self._warn_once(
                "twice",
                "GradWatch.step() called twice for one backward pass; the repeat is ignored",
            )
            return self._last_report
        step = self._step if global_step is None else global_step
        cadence = self.log_every_n_steps
        flush_due = (step + 1) // cadence > self._step // cadence  # reached or passed a multiple

        sq_norms, has_grad = probe.grad_sq_norms(pattern)
        norms = sq_norms.sqrt()
        total = sq_norms.sum().sqrt()
        if flush_due:  # first measured by _build_context
            self._weight_norms = probe.weight_sq_norms().sqrt()
        update_ratio = self._measure_updates(step) if self.track_updates else None
        grads_finite = finite(total)
        loss_finite = self._true
        loss_tensor = None
        if loss is not None:
            loss_tensor = torch.as_tensor(loss).detach().to(context.device, torch.float32)
            loss_finite = finite(loss_tensor.sum())
        overflow = self._amp_overflow(grads_finite, context.device)
        obs = StepObservation(
            step=step,
            pattern=pattern,
            sq_norms=sq_norms,
            norms=norms,
            total_norm=total,
            has_grad=has_grad,
            weight_norms=self._weight_norms,
            update_ratio=update_ratio,
            loss=loss_tensor,
            grads_finite=grads_finite,
            loss_finite=loss_finite,
            overflow=overflow,
            valid=grads_finite & loss_finite,
            context=context,
            activations=self._activations.collect() if self._activations is not None else None,
        )
        for detector, rows in zip(self.detectors, self._rows, strict=True):
            if detector.windowed:
                continue
            detection = detector.observe(obs)
            previous = obs.flags.get(detector.kind)
            obs.flags[detector.kind] = (
                detection.fired if previous is None else previous | detection.fired
            )
            rows.append(detection)  # stacked at the flush: no per-step work
        if self.nonfinite == "raise" and self._nonfinite_now(obs):
            self._history.write(step, norms, total, None, 1.0)
            self._step = step + 1
            self._flush()
            raise GradientError(self._nonfinite_alert(step))
        for remedy in self.remedies:
            remedy.apply(obs)
        if obs.skip:
            self._drop_gradients()
        self._history.write(step, norms, total, obs.clip_coef, obs.lr_scale)
        if self._histograms is not None and step % self.histogram_every_n_steps == 0:
            self._histogram_rows.append((step, self._histograms.compute(obs)))
        self._step = step + 1
        self._fingerprint = self._grad_fingerprint(pattern)
        report = StepReport(
            step=step,
            skipped=obs.skip,
            total_norm=total,
            clip_coef=obs.clip_coef,
            lr_scale=obs.lr_scale,
        )
        if flush_due:
            report.alerts = self._flush()
        self._last_report = report
        return report

    def _grad_fingerprint(self, pattern: tuple[int, ...]) -> list[tuple[weakref.ref, int]]:
        """A few gradients (weakly referenced) and their versions: unchanged means no backward."""
        params = self._context.probe.params  # type: ignore[union-attr]
        present = [i for i in (0, len(params) // 2, len(params) - 1) if pattern[i]]
        grads = [params[i].grad for i in present]
        return [(weakref.ref(g), g._version) for g in grads if g is not None]

    @staticmethod
    def _same_gradients(
        a: list[tuple[weakref.ref, int]] | None, b: list[tuple[weakref.ref, int]]
    ) -> bool:
        if a is None or len(a) != len(b) or not b:
            return False
        return all(
            ra() is not None and ra() is rb() and va == vb
            for (ra, va), (rb, vb) in zip(a, b, strict=True)
        )

    def _amp_overflow(self, grads_finite: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Whether this step is an AMP overflow step the scaler will skip (not yet persistent)."""
        if self.scaler is None or not _scaler_enabled(self.scaler):
            return self._false
        raw = ~grads_finite
        self._overflow_run = torch.where(raw, self._overflow_run + 1, 0.0)
        persistent = self._overflow_run >= _AMP_PERSISTENT_STEPS
        scale = getattr(self.scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            persistent = persistent | (scale.to(device).reshape(()) < 1.0)
        overflow = raw & ~persistent
        self._overflow_rows.append(torch.stack([overflow.float(), self._overflow_run]))
        return overflow

    def _measure_updates(self, step: int) -> torch.Tensor | None:
        """Exact ``||Δw|| / ||w||`` per layer over the update between the previous and this step."""
        probe = self._context.probe  # type: ignore[union-attr]
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
            if (step + 2) % self.log_every_n_steps == 0 or self.log_every_n_steps == 1:
                self._snapshot = [t.clone() for t in current]
        return ratio

    def _nonfinite_now(self, obs: StepObservation) -> bool:
        return obs.host_flags()[AlertKind.NONFINITE]

    def _nonfinite_alert(self, step: int) -> Alert:
        for alert in reversed(self._book.alerts):
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
            advise(AlertKind.NONFINITE, self._context.profile),  # type: ignore[union-attr]
        )

    def _drop_gradients(self) -> None:
        """Enforces a skipped step: optimizers leave parameters without a gradient untouched."""
        params = (
            [p for group in self.optimizer.param_groups for p in group["params"]]
            if self.optimizer is not None
            else list(self.model.parameters())
        )
        for param in params:
            param.grad = None

    # ------------------------------------------------------------------ the flush

    def _flush(self) -> list[Alert]:
        if self._context is None or self._history.num_pending == 0:
            return []
        context = self._context
        hist_norms, hist_scalars = self._history.pending()
        tensors = [hist_norms, hist_scalars, self._weight_norms]
        if self._update_ratio is not None:
            tensors.append(self._update_ratio)
        rows = [
            _stack_detections([d.observe_window(hist_norms, hist_scalars[:, 0])], context.device)
            if d.windowed
            else _stack_detections(r, context.device)
            for d, r in zip(self.detectors, self._rows, strict=True)
        ]
        tensors += rows
        if self._overflow_rows:
            tensors.append(torch.stack(self._overflow_rows))
        tensors += [h for _, h in self._histogram_rows]
        host = iter(to_host(tensors))
        steps = np.asarray(self._history._steps, dtype=np.int64)
        norms, scalars, weight_norms = next(host), next(host), next(host)
        update_ratio = next(host) if self._update_ratio is not None else None
        detector_rows = [next(host) for _ in rows]
        overflow_rows = next(host) if self._overflow_rows else None
        histograms = [
            (step, name, hist)
            for step, _ in self._histogram_rows
            for name, hist in self._histograms.decode(next(host))
        ]
        lr_scales = np.asarray(self._history._lr_scales, dtype=np.float32)
        self._history.commit(norms, scalars)
        for r in self._rows:
            r.clear()
        self._overflow_rows = []
        self._histogram_rows = []

        new_alerts: list[Alert] = []
        if overflow_rows is not None:
            new_alerts += self._overflow_alerts(steps, overflow_rows)
        for detector, det_rows in zip(self.detectors, detector_rows, strict=True):
            alert = self._alert_from_rows(detector, steps, det_rows)
            if alert is not None:
                new_alerts.append(alert)
        record = FlushRecord(
            layer_names=context.layer_names,
            steps=steps,
            grad_norms=norms,
            total_norms=scalars[:, 0],
            clip_coefs=scalars[:, 1] if self._clips() else None,
            lr_scales=lr_scales if self._scales_lr() else None,
            weight_norms=weight_norms,
            update_ratios=update_ratio,
            histograms=histograms,
            new_alerts=new_alerts,
            alert_counts={k.value: v for k, v in self._book.counts().items()},
        )
        self._write_sinks(record)
        return new_alerts

    def _alert_from_rows(
        self, detector: Detector, steps: np.ndarray, rows: np.ndarray
    ) -> Alert | None:
        fired = np.flatnonzero(rows[:, 0] > 0.5) if len(rows) else np.zeros(0, dtype=np.int64)
        if not len(fired):
            return None
        first = fired[0]
        value = float(rows[first, 1])
        names = detector.candidate_names()
        scores = rows[first, 2:]
        order = [i for i in np.argsort(-scores, kind="stable") if scores[i] > 0]
        layers = tuple(names[i] for i in order if i < len(names))
        alert = Alert(
            kind=detector.kind,
            step=int(steps[first]),
            layers=layers,
            value=value,
            threshold=float(detector.threshold),
            severity=detector.severity,
            message=detector.message(value, layers),
            advice=advise(detector.kind, self._context.profile, layers=layers),  # type: ignore[union-attr]
        )
        return self._book.record(alert, int(steps[fired[-1]]), len(fired))

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
        recorded = self._book.record(alert, int(steps[fired[-1]]), len(fired))
        return [recorded] if recorded is not None else []

    def _clips(self) -> bool:
        return any(getattr(r, "clips", False) for r in self.remedies)

    def _scales_lr(self) -> bool:
        return any(getattr(r, "scales_lr", False) for r in self.remedies)

    def _write_sinks(self, record: FlushRecord) -> None:
        for sink in list(self._sinks):
            try:
                sink.write(record)
            except Exception as error:  # a failing sink never stops training
                self._sinks.remove(sink)
                warnings.warn(
                    f"gradwatch: sink {type(sink).__name__} failed ({error!r}); it is disabled and "
                    "training continues (history and alerts are kept)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _load_engine_state(self, state: dict[str, Any]) -> None:
        if list(state.get("layer_names", [])) != self.layer_names:
            self._warn_once(
                "state-layers",
                "GradWatch.load_state_dict: the saved layers differ from this model's; "
                "history and statistics are not restored",
            )
            return
        if "history" in state:
            self._history.load_state_dict(state["history"])
        for part in ("detectors", "remedies"):
            objects: list[Detector | Remedy] = list(getattr(self, part))
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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _stack_detections(detections: list[Detection], device: torch.device) -> torch.Tensor:
    """Stacks detections into ``[k, 2 + C]`` rows: fired, value, then the scores.

    Per-step detections hold 0-d verdicts and ``[C]`` scores (one per step); a windowed one holds
    ``[k]`` verdicts and ``[k, C]`` scores already.
    """
    if not detections:
        return torch.zeros(0, 2, device=device)
    columns = [
        torch.stack([d.fired for d in detections]).float().reshape(-1, 1),
        torch.stack([d.value for d in detections]).float().reshape(-1, 1),
    ]
    if all(d.scores is not None for d in detections):
        scores = torch.stack([d.scores for d in detections])  # type: ignore[misc]
        columns.append(scores.float().reshape(columns[0].shape[0], -1))
    return torch.cat(columns, dim=1)


def _scaler_enabled(scaler: Any) -> bool:
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def _resolve_detectors(
    detectors: str | Sequence[Detector], check_activations: bool, track_updates: bool
) -> list[Detector]:
    if isinstance(detectors, str):
        if detectors != "default":
            raise ValueError(
                f"detectors must be 'default' or a sequence of detectors, got {detectors!r}"
            )
        from gradwatch.detectors import default_detectors

        return default_detectors(check_activations=check_activations, track_updates=track_updates)
    if not isinstance(detectors, Sequence):
        raise TypeError(
            f"detectors must be 'default' or a sequence of detectors, got {detectors!r}"
        )
    for index, detector in enumerate(detectors):
        if not isinstance(detector, Detector):
            raise TypeError(
                f"detectors[{index}] must be a gradwatch detector (e.g. gw.SpikeDetector()), "
                f"got {detector!r}"
            )
    return list(cast("Sequence[Detector]", detectors))


def _resolve_remedies(remedies: Sequence[Remedy], optimizer: object) -> list[Remedy]:
    if not isinstance(remedies, Sequence) or isinstance(remedies, str):
        raise TypeError(f"remedies must be a sequence of remedies, got {remedies!r}")
    for index, remedy in enumerate(remedies):
        if not isinstance(remedy, Remedy):
            raise TypeError(
                f"remedies[{index}] must be a gradwatch remedy (e.g. gw.ZClip()), got {remedy!r}"
            )
        if remedy.needs_optimizer and optimizer is None:
            raise ValueError(
                f"remedies[{index}] ({type(remedy).__name__}) acts on the optimizer: "
                "pass it, GradWatch(model, optimizer, remedies=...)"
            )
    return list(remedies)
