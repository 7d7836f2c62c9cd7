"""Audit: a pre-flight check of a model from one forward/backward pass, before training starts.

:func:`audit` runs the model once on an example batch under a
``GradWatch(model, log_every_n_steps=1, check_activations=True)`` with the default and activation
detectors, and adds what a single step can already tell:

- a static look at the model (depth, activations, normalisation, residual connections, recurrent
  cells, weight scale against He/Xavier) that names the risks before any statistic has a window;
- a single-step vanishing check: the gradient RMS (norm / sqrt(number of elements), a scale-free
  per-element size) of the first layer in forward order against the last layer's. Below
  :data:`~gradwatch.engine.thresholds.SINGLE_STEP_VANISHING_RATIO` the first layers will barely
  learn, so a VANISHING alert is reported even though the runtime detector waits for a patience
  window;
- residual connections confirmed by tracing the forward pass (see :func:`_count_skip_additions`).

The user's model is left as it was: gradients, buffers (BatchNorm running statistics), train/eval
modes and the random number generator state are restored afterwards, and every hook gradwatch
installed is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradwatch.engine.advice import advise
from gradwatch.engine.alerts import Alert, AlertKind
from gradwatch.engine.alerts import logger as alerts_logger
from gradwatch.engine.layers import Layer, unwrap
from gradwatch.engine.profile import ModelProfile
from gradwatch.engine.roles import HE_INIT_ROLES
from gradwatch.engine.text import display_name, fmt, format_layers
from gradwatch.engine.thresholds import (
    DEEP_LAYERS,
    INIT_TOO_LARGE,
    INIT_TOO_SMALL,
    RADIUS_TOO_LARGE,
    SINGLE_STEP_VANISHING_RATIO,
)
from gradwatch.engine.transfer import to_host
from gradwatch.watch import GradWatch

_TABLE_EDGE = 12  # a layer table longer than twice this shows its first and last rows only
_ADD_FUNCTIONS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})


@dataclass(frozen=True)
class LayerAudit:
    """One layer at the audit step.

    Attributes:
        name: Module path (``""`` for the root).
        module: Module class name.
        numel: Number of trainable elements.
        grad_norm: L2 norm of its gradient (NaN when no parameter got a gradient).
        weight_norm: L2 norm of its parameters.
        grad_rms: ``grad_norm / sqrt(numel)``.
        rms_ratio: ``grad_rms`` over the last layer's (NaN when undefined).
    """

    name: str
    module: str
    numel: int
    grad_norm: float
    weight_norm: float
    grad_rms: float
    rms_ratio: float


@dataclass(frozen=True)
class AuditReport:
    """What :func:`audit` found.

    Attributes:
        model: Class name of the model.
        loss: The loss of the audit step.
        layers: Per-layer picture, in forward order.
        alerts: Alerts of the audit step (detectors plus the single-step vanishing check), with
            advice fitted to the model.
        findings: Risks read from the model's structure (depth, activations, initialisation...).
        profile: What the model contains.
        first_last_ratio: First-layer over last-layer gradient RMS (NaN when undefined).
    """

    model: str
    loss: float
    layers: tuple[LayerAudit, ...]
    alerts: tuple[Alert, ...]
    findings: tuple[str, ...]
    profile: ModelProfile
    first_last_ratio: float

    @property
    def warnings(self) -> tuple[Alert, ...]:
        """Alerts of severity warning or error."""
        return tuple(a for a in self.alerts if a.severity in ("warning", "error"))

    @property
    def ok(self) -> bool:
        """No warning, no error and no structural risk."""
        return not self.warnings and not self.findings

    def __str__(self) -> str:
        profile = self.profile
        lines = [
            f"gradwatch audit: {self.model}, {len(self.layers)} layers with parameters, "
            f"loss {fmt(self.loss)}",
            "  " + _describe(profile),
            f"  {'layer':<20} {'type':<14} {'grad norm':>10} {'weight norm':>11} "
            f"{'grad RMS':>10} {'RMS/last':>9}",
        ]
        rows: list[LayerAudit | None] = list(self.layers)
        if len(rows) > 2 * _TABLE_EDGE:
            rows = [*rows[:_TABLE_EDGE], None, *rows[-_TABLE_EDGE:]]
        for row in rows:
            if row is None:
                lines.append(f"  ... {len(self.layers) - 2 * _TABLE_EDGE} more layers ...")
                continue
            lines.append(
                f"  {display_name(row.name):<20} {row.module:<14} {fmt(row.grad_norm):>10} "
                f"{fmt(row.weight_norm):>11} {fmt(row.grad_rms):>10} {fmt(row.rms_ratio):>9}"
            )
        if self.findings:
            lines.append("risks:")
            lines += [f"  - {finding}" for finding in self.findings]
        if self.alerts:
            lines.append("alerts:")
            for alert in self.alerts:
                where = f" in {format_layers(alert.layers)}" if alert.layers else ""
                lines.append(f"  [{alert.severity}] {alert.kind.value}{where}: {alert.message}")
            advice = dict.fromkeys(item for alert in self.alerts for item in alert.advice)
            if advice:
                lines.append("advice:")
                lines += [f"  - {item}" for item in advice]
        if self.ok:
            lines.append("No problems found.")
        return "\n".join(lines)


def audit(
    model: nn.Module,
    example_input: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> AuditReport:
    """Checks ``model`` with one forward/backward pass before training.

    The model runs in training mode on ``example_input``; gradients, buffers, train/eval modes and
    the RNG state are restored afterwards and every hook is removed, so the model is exactly as it
    was (lazy modules excepted: they materialise). The alerts are returned in the report, not sent
    to the ``gradwatch`` logger.

    Example:
        >>> net = torch.nn.Sequential(*[m for _ in range(30)
        ...                             for m in (torch.nn.Linear(16, 16), torch.nn.Tanh())])
        >>> report = audit(net, torch.randn(64, 16))
        >>> report.warnings[0].kind.value
        'vanishing'

    Args:
        model: The model (``DistributedDataParallel``/``torch.compile`` wrappers are unwrapped).
        example_input: One batch: a tensor, a tuple/list of positional arguments, or a dict of
            keyword arguments.
        loss_fn: ``loss_fn(output) -> 0-d tensor``. Default: the mean square of the output
            (``output.float().pow(2).mean()``, summed over every floating-point tensor of a
            tuple/list/dict output), which sends a gradient proportional to the output through the
            whole network.
        optimizer: The optimizer you will train with, so advice can quote its learning rate.

    Returns:
        The report; ``print(report)`` shows it.

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` not callable, or the default loss finds no
            floating-point tensor in the output.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {loss_fn!r}")
    model = unwrap(model)
    compute_loss = loss_fn or default_loss
    with _untouched(model), _alerts_not_logged():
        model.train()
        profile = ModelProfile.inspect(model, optimizer)
        watch = GradWatch(model, log_every_n_steps=1, check_activations=True)
        try:
            with torch.enable_grad():
                loss = compute_loss(_call(model, example_input))
                loss.backward()
            watch.step(loss=loss)
        finally:
            watch.close()
        rows = _layer_rows(list(watch.engine.layout.layers))
        skips = _count_skip_additions(model, example_input, list(watch.engine.layout.layers))
    if skips:
        profile.residual = True
        profile.residual_evidence = (*profile.residual_evidence, f"traced ({skips} skip additions)")
    alerts = [
        dataclasses.replace(a, advice=advise(a.kind, profile, layers=a.layers, value=a.value))
        for a in watch.alerts
    ]
    first_last = rows[0].rms_ratio if rows else float("nan")
    static = _vanishing_alert(rows, profile)
    if static is not None and not any(a.kind is AlertKind.VANISHING for a in alerts):
        alerts.append(static)
    return AuditReport(
        model=type(model).__name__,
        loss=float(loss.detach().float()),
        layers=tuple(rows),
        alerts=tuple(alerts),
        findings=tuple(_findings(profile, rows)),
        profile=profile,
        first_last_ratio=first_last,
    )


def default_loss(output: Any) -> torch.Tensor:
    """The audit's default loss: mean square of each floating-point tensor of ``output``, summed."""
    tensors = [t for t in _tensors(output) if t.is_floating_point()]
    if not tensors:
        raise TypeError(
            f"the model output ({type(output).__name__}) holds no floating-point tensor: "
            "pass loss_fn=lambda output: ... to audit()"
        )
    return torch.stack([t.float().pow(2).mean() for t in tensors]).sum()


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restores gradients, buffers, modes and the RNG state of ``model`` on exit."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [
        (module, name, buffer, buffer.detach().clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    modes = [(module, module.training) for module in model.modules()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    for param in params:
        param.grad = None
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        with torch.no_grad():
            for module, name, buffer, saved in buffers:
                module._buffers[name] = buffer
                buffer.copy_(saved)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _alerts_not_logged() -> Iterator[None]:
    """Keeps the audit's alerts off the ``gradwatch`` logger: they are in the report."""
    previous = alerts_logger.disabled
    alerts_logger.disabled = True
    try:
        yield
    finally:
        alerts_logger.disabled = previous


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    return model(example_input)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)


def _layer_rows(layers: list[Layer]) -> list[LayerAudit]:
    """Per-layer gradient and weight norms, read in one host transfer."""
    if not layers:
        return []
    with torch.no_grad():
        values = []
        for layer in layers:
            grads = [p.grad for p in layer.params if p.grad is not None]
            grad_sq = (
                torch.stack(
                    [g.float().pow(2).sum().to(layers[0].params[0].device) for g in grads]
                ).sum()
                if grads
                else torch.tensor(float("nan"), device=layers[0].params[0].device)
            )
            weight_sq = torch.stack(
                [p.detach().float().pow(2).sum().to(grad_sq.device) for p in layer.params]
            ).sum()
            values.append(torch.stack([grad_sq, weight_sq]))
        host = to_host([torch.stack(values)])[0]
    rows = []
    last_rms = math.sqrt(float(host[-1, 0])) / math.sqrt(max(layers[-1].numel, 1))
    for layer, (grad_sq, weight_sq) in zip(layers, host, strict=True):
        grad_norm = math.sqrt(float(grad_sq)) if grad_sq >= 0 else float(grad_sq)
        rms = grad_norm / math.sqrt(max(layer.numel, 1))
        rows.append(
            LayerAudit(
                name=layer.name,
                module=type(layer.module).__name__,
                numel=layer.numel,
                grad_norm=grad_norm,
                weight_norm=math.sqrt(float(weight_sq)),
                grad_rms=rms,
                rms_ratio=rms / last_rms if last_rms > 0 else float("nan"),
            )
        )
    return rows


def _vanishing_alert(rows: list[LayerAudit], profile: ModelProfile) -> Alert | None:
    """The single-step VANISHING check: first-layer gradient RMS far below the last layer's."""
    ratio = SINGLE_STEP_VANISHING_RATIO
    if len(rows) < 2 or rows[0].grad_norm == 0 or not rows[0].rms_ratio < ratio:
        return None  # an exactly zero gradient is blocked (zero-initialised layer), not vanishing
    starving = []
    for row in rows:
        if row.grad_norm == 0:  # blocked behind a zero-initialised layer: no evidence either way
            continue
        if not row.rms_ratio < ratio:
            break
        starving.append(row.name)
    kind = "/".join(sorted(profile.activations)) + " " if profile.activations else ""
    depth = profile.weight_layers or len(rows)
    return Alert(
        kind=AlertKind.VANISHING,
        step=0,
        layers=tuple(starving),
        value=rows[0].rms_ratio,
        threshold=ratio,
        severity="warning",
        message=(
            f"your {depth}-layer {kind}net will starve its first layers: the first layer's "
            f"gradient RMS is {rows[0].rms_ratio:.1e} of the last layer's "
            f"(below {ratio:g}), so {len(starving)} layer(s) will barely learn"
        ),
        advice=advise(AlertKind.VANISHING, profile),
    )


def _findings(profile: ModelProfile, rows: list[LayerAudit]) -> list[str]:
    """Risks read from the structure of the model and the audit step."""
    out = []
    deep = profile.weight_layers >= DEEP_LAYERS
    plain = not profile.has_norm and not profile.residual
    if deep and plain and profile.saturating:
        out.append(
            f"{profile.weight_layers} Linear/Conv layers with "
            f"{'/'.join(sorted(profile.saturating))} and neither normalisation nor residual "
            "connections: gradients shrink layer by layer"
        )
    he = profile.he_ratio
    if he is not None and not profile.has_norm:
        if deep and plain and profile.having(*HE_INIT_ROLES) and he < INIT_TOO_SMALL:
            out.append(
                f"weights are {he:.2f}x the He scale with ReLU-like activations and no "
                "normalisation: signals shrink layer by layer"
            )
        if he > INIT_TOO_LARGE:
            out.append(
                f"weights are {he:.2f}x the He scale and there is no normalisation: activations "
                "and gradients grow layer by layer"
            )
    radius = profile.recurrent_radius
    if radius is not None and radius > RADIUS_TOO_LARGE:
        out.append(
            f"the recurrent matrix has spectral radius {radius:.2g} > 1: gradients grow "
            "exponentially through time"
        )
    if rows and all(row.grad_norm == 0 for row in rows):
        out.append("every gradient is zero: check that the loss depends on the output (loss_fn)")
    elif rows and rows[0].grad_norm == 0:
        out.append(
            f"the first layer ({display_name(rows[0].name)}) gets an exactly zero gradient: a "
            "zero-initialised layer after it blocks the gradient at the first step, so the "
            "single-step vanishing check was skipped"
        )
    return out


def _describe(profile: ModelProfile) -> str:
    parts = [
        f"activations: {', '.join(sorted(profile.activations)) or 'none found (functional?)'}",
        f"normalisation: {', '.join(sorted(profile.norms)) or 'none'}",
        f"residual: {'yes' if profile.residual else 'no'}",
    ]
    if profile.recurrent:
        parts.append(f"recurrent: {', '.join(sorted(profile.recurrent))}")
    if profile.he_ratio is not None and profile.xavier_ratio is not None:
        parts.append(f"init: {profile.he_ratio:.2f}x He, {profile.xavier_ratio:.2f}x Xavier")
    return "; ".join(parts)


def _count_skip_additions(model: nn.Module, example_input: Any, layers: list[Layer]) -> int:
    """Residual connections seen in a traced forward pass (no gradients, hooks removed after).

    Every tensor is labelled with the set of layers it depends on (model inputs: the empty set; a
    layer's output: its inputs' layers plus itself; any other torch operation: the union of its
    inputs'). An addition of two same-shaped tracked tensors where one's set is a strict subset of
    the other's adds a value to something computed from it: a skip connection (``x + f(x)``). Two
    parallel branches (``f(x) + g(x)``) or parameters (``x + self.pos_embedding``) do not count.

    Returns:
        The number of skip additions; 0 when tracing fails (the name heuristic then stands alone).
    """
    tracer = _SkipTracer()
    for value in _tensors(example_input):
        tracer.label(value, frozenset())
    handles = [
        layer.module.register_forward_hook(tracer.layer_hook(index))
        for index, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad(), tracer:
            _call(model, example_input)
    except Exception:  # an untraceable model keeps the static heuristic only
        return 0
    finally:
        for handle in handles:
            handle.remove()
    return tracer.skips


class _SkipTracer(TorchFunctionMode):
    """Labels tensors with the layers they depend on and counts skip additions."""

    def __init__(self) -> None:
        super().__init__()
        self.skips = 0
        self._labels: dict[int, frozenset[int]] = {}
        self._alive: list[torch.Tensor] = []  # keeps labelled tensors alive so ids stay unique

    def label(self, tensor: torch.Tensor, layers: frozenset[int]) -> None:
        """Sets the layer set of ``tensor``."""
        if id(tensor) not in self._labels:
            self._alive.append(tensor)
        self._labels[id(tensor)] = layers

    def layer_hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        """A forward hook adding layer ``index`` to its output's set."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            inputs = self._union(args) or frozenset()
            for tensor in _tensors(output):
                self.label(tensor, inputs | self._labels.get(id(tensor), frozenset()) | {index})

        return hook

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _ADD_FUNCTIONS and len(args) >= 2:
            self._check_skip(args[0], args[1])
        inputs = self._union((args, kwargs))
        output = func(*args, **kwargs)
        if inputs is not None:
            for tensor in _tensors(output):
                self.label(tensor, inputs | self._labels.get(id(tensor), frozenset()))
        return output

    def _check_skip(self, left: Any, right: Any) -> None:
        if not isinstance(left, torch.Tensor) or not isinstance(right, torch.Tensor):
            return
        if isinstance(left, nn.Parameter) or isinstance(right, nn.Parameter):
            return
        a, b = self._labels.get(id(left)), self._labels.get(id(right))
        if a is None or b is None or left.shape != right.shape:
            return
        if a < b or b < a:
            self.skips += 1

    def _union(self, value: Any) -> frozenset[int] | None:
        """Union of the sets of the tracked tensors in ``value``; None when none is tracked."""
        sets = [self._labels[id(t)] for t in _tensors(value) if id(t) in self._labels]
        return frozenset().union(*sets) if sets else None
