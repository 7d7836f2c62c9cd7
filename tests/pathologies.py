"""Planted pathologies on the architecture zoo, and what gradwatch said about them.

:func:`run` trains one zoo model (``tests/arch_zoo.py``) with one pathology planted, watched by
whatever ``gradwatch`` is importable, and records every alert with the step it was detected at and
the step it was *delivered* at (the training step during which ``on_alert`` ran, or ``steps`` for
alerts that only surfaced at ``close()``), plus the first step whose loss was non-finite.
:func:`judge` turns a run into one row of the diagnosis table (``scripts/diagnosis_table.py``);
``tests/test_diagnosis.py`` asserts on the run's records directly, with the same criteria.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradwatch as gw
from tests import arch_zoo
from tests.arch_zoo import Task

LR_STEP = 50  # the learning rate is multiplied at this step
NAN_STEP = 60  # the NaN is planted at this step
DEAD_BIAS = -1e3  # bias of the dead ReLU layer: every unit is negative on every digit
WARNINGS = ("warning", "error")
DIVERGENCE_KINDS = ("spike", "exploding")
ORIGINS = ("input", "forward", "loss", "backward")


@dataclass(frozen=True)
class Pathology:
    """A fault planted in a training run.

    Attributes:
        name: Short name (a table column).
        description: What is planted.
        options: ``GradWatch`` keyword arguments for the run.
        applies: Whether the pathology can be planted in a zoo model (by name and task).
        lr_factor: Multiplies every learning rate at :data:`LR_STEP`.
        nan_input: Plants a NaN in the input batch of :data:`NAN_STEP`.
        nan_module: Makes one inner module emit NaN at :data:`NAN_STEP`.
        frozen: ``"grad"``: the backbone has ``requires_grad=False``; ``"optimizer"``: it keeps
            its gradients but only the head is in the optimizer.
        lr_zero: Every learning rate is 0.
        dead_relu: The first ReLU layer's bias is :data:`DEAD_BIAS` (every unit dead).
        activation: A 20-layer MLP with this activation replaces the model (``"mlp"`` only).
    """

    name: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    applies: Callable[[str, Task], bool] = lambda model, task: True
    lr_factor: float = 1.0
    nan_input: bool = False
    nan_module: bool = False
    frozen: str | None = None
    lr_zero: bool = False
    dead_relu: bool = False
    activation: type[nn.Module] | None = None


OPT_IN = {"check_activations": True, "track_updates": True}


def _only_mlp(model: str, task: Task) -> bool:
    return model == "mlp"


PATHOLOGIES: dict[str, Pathology] = {
    p.name: p
    for p in (
        Pathology("healthy", "no fault, default detectors"),
        Pathology("healthy_optin", "no fault, check_activations + track_updates", OPT_IN),
        Pathology("lr_x100", f"learning rate x100 at step {LR_STEP}", lr_factor=100.0),
        Pathology("lr_x1000", f"learning rate x1000 at step {LR_STEP}", lr_factor=1000.0),
        Pathology(
            "nan_input",
            f"NaN in one input batch (step {NAN_STEP})",
            applies=lambda model, task: task.float_inputs,
            nan_input=True,
        ),
        Pathology(
            "nan_module",
            f"one inner module emits NaN at step {NAN_STEP} (check_activations)",
            {"check_activations": True},
            nan_module=True,
        ),
        Pathology(
            "sigmoid20",
            "20-layer sigmoid MLP, default init",
            applies=_only_mlp,
            activation=nn.Sigmoid,
        ),
        Pathology(
            "tanh20", "20-layer tanh MLP, default init", applies=_only_mlp, activation=nn.Tanh
        ),
        Pathology(
            "dead_relu",
            f"first ReLU layer's bias set to {DEAD_BIAS:g} (100 % dead units)",
            applies=lambda model, task: task.relu_layer is not None,
            dead_relu=True,
        ),
        Pathology("lr0", "learning rate 0 (track_updates)", {"track_updates": True}, lr_zero=True),
        Pathology(
            "frozen",
            "backbone requires_grad=False, head trained",
            applies=lambda model, task: bool(task.head),
            frozen="grad",
        ),
        Pathology(
            "head_only",
            "backbone has gradients but only the head is in the optimizer",
            applies=lambda model, task: bool(task.head),
            frozen="optimizer",
        ),
    )
}


@dataclass(frozen=True)
class Record:
    """One alert as the user received it."""

    kind: str
    step: int
    delivered: int | None
    severity: str
    layers: tuple[str, ...]
    message: str
    advice: tuple[str, ...]
    origin: str | None


@dataclass
class Run:
    """What happened in one watched training run.

    Attributes:
        model: Zoo model name.
        pathology: Pathology name.
        seed: Seed of weights and data.
        steps: Steps trained.
        alerts: Every alert, in the order gradwatch produced them.
        first_nonfinite_loss: First step whose loss was NaN/Inf, or None.
        target: The planted module / dead layer, when the pathology has one.
        backbone: Names of the frozen (or not optimised) layers, for ``frozen``/``head_only``.
        loss_start: Mean loss of the first 10 steps.
        loss_end: Mean finite loss of the last 10 steps (NaN if none is finite).
        seconds: Wall time of the run.
        error: The exception the training loop raised, if any (gradwatch must never cause one).
    """

    model: str
    pathology: str
    seed: int
    steps: int
    alerts: list[Record] = field(default_factory=list)
    first_nonfinite_loss: int | None = None
    target: str | None = None
    backbone: tuple[str, ...] = ()
    loss_start: float = math.nan
    loss_end: float = math.nan
    seconds: float = 0.0
    error: str | None = None

    @property
    def warnings(self) -> list[Record]:
        """The warning and error alerts, by the step they were detected at."""
        return sorted((a for a in self.alerts if a.severity in WARNINGS), key=lambda a: a.step)


def origin_of(alert: Any) -> str | None:
    """The NaN origin an alert names: its ``origin`` field if it has one, else its message.

    Returns one of :data:`ORIGINS`, or None when the alert names no origin.
    """
    origin = getattr(alert, "origin", None)
    if origin is not None:
        text = str(getattr(origin, "value", origin)).lower()
        return next((o for o in ORIGINS if o in text), text)
    message = str(getattr(alert, "message", "")).lower()
    patterns = {
        "input": r"origin\W+input|in the input|input batch|inputs? (is|are|contains?) (nan|non)",
        "forward": r"origin\W+forward|forward pass",
        "loss": r"origin\W+loss|in the loss|loss function|loss is (nan|non-?finite) while",
        "backward": r"origin\W+backward|backward pass",
    }
    for name, pattern in patterns.items():
        if re.search(pattern, message):
            return name
    return None


def _record(alert: Any, delivered: int | None) -> Record:
    kind = getattr(alert.kind, "value", alert.kind)
    return Record(
        kind=str(kind),
        step=int(alert.step),
        delivered=delivered,
        severity=str(alert.severity),
        layers=tuple(alert.layers),
        message=str(alert.message),
        advice=tuple(getattr(alert, "advice", ())),
        origin=origin_of(alert) if str(kind) == "nonfinite" else None,
    )


def _forward_order(task: Task) -> list[str]:
    """Names of the leaf modules with parameters whose output is one tensor, in forward order."""
    order: list[str] = []
    handles = []
    for name, module in task.model.named_modules():
        if name and not list(module.children()) and list(module.parameters(recurse=False)):

            def hook(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
                if isinstance(output, torch.Tensor) and output.is_floating_point():
                    order.append(name)

            handles.append(module.register_forward_hook(hook))
    inputs, targets = task.batch(0)
    with torch.no_grad():
        task.loss(task.model, inputs, targets)
    for handle in handles:
        handle.remove()
    return list(dict.fromkeys(order))


class _EmitNaN:
    """Forward hook: the module's output turns NaN while ``armed``."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        return output * math.nan if self.armed else None


def build_task(model: str, pathology: Pathology, seed: int) -> Task:
    """The zoo task of ``model`` (or the 20-layer MLP the pathology calls for)."""
    if pathology.activation is not None:
        torch.manual_seed(seed)
        return arch_zoo.deep_mlp_task(pathology.activation, seed)
    return arch_zoo.build(model, seed)


def applicable(model: str, pathology: str, seed: int = 0) -> bool:
    """Whether ``pathology`` can be planted in zoo model ``model``."""
    return PATHOLOGIES[pathology].applies(model, arch_zoo.build(model, seed))


def _in_head(name: str, head: tuple[str, ...]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def run(
    model: str,
    pathology: str,
    *,
    seed: int = 0,
    steps: int = 200,
    options: dict[str, Any] | None = None,
) -> Run:
    """Trains ``model`` with ``pathology`` planted for ``steps`` steps under a ``GradWatch``.

    Args:
        model: A zoo model name (``arch_zoo.MODELS``).
        pathology: A :data:`PATHOLOGIES` name.
        seed: Seed of the weights and the data order.
        steps: Steps to train.
        options: Extra ``GradWatch`` keyword arguments (override the pathology's).

    Returns:
        The run's record.
    """
    spec = PATHOLOGIES[pathology]
    task = build_task(model, spec, seed)
    result = Run(model=model, pathology=pathology, seed=seed, steps=steps)
    net = task.model
    net.train()

    trained = list(net.parameters())
    if spec.frozen is not None:
        backbone = {n for n, _ in net.named_modules() if n and not _in_head(n, task.head)}
        owners = {
            n for n, m in net.named_modules() if n in backbone and list(m.parameters(recurse=False))
        }
        result.backbone = tuple(sorted(owners))
        trained = [p for n, p in net.named_parameters() if _in_head(n, task.head)]
        if spec.frozen == "grad":
            for n, p in net.named_parameters():
                p.requires_grad_(_in_head(n, task.head))
    if spec.dead_relu:
        assert task.relu_layer is not None
        layer = net.get_submodule(task.relu_layer)
        with torch.no_grad():
            layer.bias.fill_(DEAD_BIAS)  # type: ignore[operator]
        result.target = task.relu_layer
    emit = _EmitNaN()
    if spec.nan_module:
        order = _forward_order(task)
        result.target = order[len(order) // 3]
        net.get_submodule(result.target).register_forward_hook(emit)

    optimizer = task.optimizer(trained)
    if spec.lr_zero:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    current = [0]
    delivered: dict[int, int] = {}

    def on_alert(alert: Any) -> None:
        delivered[id(alert)] = current[0]

    watch_options = {**spec.options, **(options or {})}
    losses: list[float] = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradwatch's one-time runtime warnings are not alerts
        watch = gw.GradWatch(net, optimizer, on_alert=on_alert, **watch_options)
        try:
            for step in range(steps):
                current[0] = step
                if step == LR_STEP and spec.lr_factor != 1.0:
                    for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                        group["lr"] = lr * spec.lr_factor
                inputs, targets = task.batch(step)
                if spec.nan_input and step == NAN_STEP:
                    inputs = inputs.clone()
                    inputs[0] = math.nan
                emit.armed = spec.nan_module and step == NAN_STEP
                loss = task.loss(net, inputs, targets)
                loss.backward()
                report = watch.step(loss=loss)
                if not report.skipped:
                    optimizer.step()
                net.zero_grad(set_to_none=True)
                value = loss.item()
                losses.append(value)
                if not math.isfinite(value) and result.first_nonfinite_loss is None:
                    result.first_nonfinite_loss = step
        except Exception as error:  # recorded: the table shows it, the tests fail on it
            result.error = repr(error)
        current[0] = steps
        watch.close()
    result.seconds = time.perf_counter() - start
    result.alerts = [_record(a, delivered.get(id(a))) for a in watch.alerts]
    finite = [v for v in losses[-10:] if math.isfinite(v)]
    result.loss_start = sum(losses[:10]) / max(1, len(losses[:10]))
    result.loss_end = sum(finite) / len(finite) if finite else math.nan
    return result


@dataclass
class Verdict:
    """One row of the diagnosis table.

    Attributes:
        found: Whether the pathology was diagnosed as the issue demands (for healthy runs and
            frozen backbones: whether gradwatch stayed quiet).
        kind: Kind of the alert that diagnosed it ("" if none).
        detected: Step the diagnosing alert was detected at.
        delivered: Step it reached the user at (``steps`` = at close()).
        before_nan: Steps between delivery and the first non-finite loss (positive = in time).
        origin: The NaN origin the alert names, or None.
        false_alarms: Warning/error alerts that do not belong to the pathology.
        note: A short explanation.
    """

    found: bool
    kind: str = ""
    detected: int | None = None
    delivered: int | None = None
    before_nan: int | None = None
    origin: str | None = None
    false_alarms: list[Record] = field(default_factory=list)
    note: str = ""


def _names(alert: Record, layer: str) -> bool:
    return layer in alert.layers[:1] or f"'{layer}'" in alert.message


def judge(result: Run) -> Verdict:
    """Whether the run's alerts diagnose its pathology (see the module docstring)."""
    spec = PATHOLOGIES[result.pathology]
    warned = result.warnings
    nan_at = result.first_nonfinite_loss
    if result.error is not None:
        return Verdict(False, note=f"training raised {result.error}")

    def verdict(
        hit: Record | None, onset: int, fits: Callable[[Record], bool], note: str = ""
    ) -> Verdict:
        false = [a for a in warned if a.step < onset or not fits(a)]
        if hit is None:
            return Verdict(False, false_alarms=false, note=note or "not diagnosed")
        before = None
        if nan_at is not None and hit.delivered is not None:
            before = nan_at - hit.delivered
        return Verdict(True, hit.kind, hit.step, hit.delivered, before, hit.origin, false, note)

    if result.pathology in ("healthy", "healthy_optin"):
        return Verdict(not warned, false_alarms=list(warned))

    if spec.lr_factor != 1.0:
        fits = lambda a: a.step >= LR_STEP  # noqa: E731 (anything after the change is about it)
        candidates = [a for a in warned if a.step >= LR_STEP and a.kind in DIVERGENCE_KINDS]
        in_time = [
            a
            for a in candidates
            if nan_at is None or (a.delivered is not None and a.delivered < nan_at)
        ]
        if in_time:
            return verdict(in_time[0], LR_STEP, fits)
        if candidates:
            row = verdict(candidates[0], LR_STEP, fits)
            row.note = "announced after the loss turned non-finite"
        else:
            other = next((a for a in warned if a.step >= LR_STEP), None)
            row = verdict(other, LR_STEP, fits)
            row.note = f"no spike/exploding alert (first: {other.kind})" if other else "no alert"
        row.found = False
        return row

    if spec.nan_input or spec.nan_module:
        hits = [a for a in warned if a.kind == "nonfinite" and a.step >= NAN_STEP]
        hit = hits[0] if hits else None
        row = verdict(hit, NAN_STEP, lambda a: a.step >= NAN_STEP)
        if hit is None:
            return row
        if spec.nan_input:
            row.found = hit.step == NAN_STEP and hit.origin == "input"
            row.note = "" if row.found else f"origin named: {hit.origin or 'none'}"
        else:
            assert result.target is not None
            named = _names(hit, result.target)
            row.found = hit.step == NAN_STEP and hit.origin == "forward" and named
            row.note = f"target {result.target!r}" + ("" if named else f", named {hit.layers[:1]}")
        return row

    if spec.activation is not None:
        fits = lambda a: a.kind in ("vanishing", "saturation")  # noqa: E731
        return verdict(next((a for a in warned if a.kind == "vanishing"), None), 0, fits)

    if spec.dead_relu:
        assert result.target is not None
        target = result.target
        fits = lambda a: target in a.layers  # noqa: E731
        return verdict(next((a for a in warned if fits(a)), None), 0, fits)

    if spec.lr_zero:
        fits = lambda a: a.kind == "stagnation"  # noqa: E731
        return verdict(next((a for a in warned if fits(a)), None), 0, fits)

    # frozen / head_only: quiet, and no alert of any severity names a backbone layer
    backbone = set(result.backbone)
    named = [a for a in result.alerts if backbone.intersection(a.layers)]
    note = f"{len(named)} alert(s) name backbone layers" if named else ""
    return Verdict(not warned and not named, false_alarms=list(warned), note=note)
