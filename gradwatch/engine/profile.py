"""The model profile: what a model contains (activations, normalisation, residual structure,
recurrent cells, initialisation scale, optimizer), inspected once, for advice.

:meth:`ModelProfile.inspect` looks through a model without running it, when the watch is created:
before training changes the weights, so the initialisation scale is the one the model started
with. Module roles come from :mod:`gradwatch.engine.roles`.
"""

from __future__ import annotations

import ast
import inspect as pyinspect
import math
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradwatch.engine.distributed import held_whole
from gradwatch.engine.remedies import Remedy
from gradwatch.engine.roles import Role, role_of, weight_fans
from gradwatch.engine.thresholds import (
    INIT_BAND,
    INIT_SAMPLE,
    MAX_EIG_SIZE,
    ORTHOGONAL_TOLERANCE,
)
from gradwatch.engine.transfer import to_host

_BUILTIN_RESIDUAL = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# Class-name fragments and child names that mark a residual block (ResNet, pre-LN transformers...).
_RESIDUAL_CLASS_WORDS = ("residual", "resblock", "bottleneck", "basicblock")
_RESIDUAL_CHILDREN = frozenset({"downsample", "shortcut", "skip", "residual", "res_proj"})
# Names that, added to something computed in ``forward``, mark a skip connection in its source.
_SKIP_NAMES = frozenset({"identity", "residual", "shortcut", "skip"})
_ADDS_INPUT: dict[type[nn.Module], bool] = {}  # per class: its forward source adds its input


@dataclass
class ModelProfile:
    """What a model contains, inspected once.

    Attributes:
        activations: Class name -> role of every activation module class present (``"Sigmoid"``:
            saturating...). Functional activations (``torch.tanh`` in ``forward``) are invisible.
        activation_modules: Module path -> activation class name.
        has_norm: Any normalisation layer.
        norms: Class names of normalisation layers.
        residual: Residual (skip) connections were found.
        residual_evidence: Where: module paths (names/types/source heuristic) or ``"traced"``.
        recurrent: Class names of recurrent modules (``"RNN"``, ``"LSTM"``...).
        recurrent_radius: Largest spectral radius of a plain RNN's hidden-to-hidden matrix, if any.
        recurrent_orthogonal: Every plain RNN hidden-to-hidden matrix is orthogonal up to a scale.
        lstm_forget_bias: Mean forget-gate bias (``b_ih + b_hh``) over LSTM layers, if any.
        depth: Number of layers with trainable weights (modules owning parameters).
        weight_layers: Number of Linear/Bilinear/Conv layers.
        he_ratio: Median over Linear/Conv weights of ``std / sqrt(2 / fan_in)`` (zero-initialised
            weights left out), None without such weights.
        xavier_ratio: The same against ``sqrt(2 / (fan_in + fan_out))``.
        init_ratios: Module path -> ``(he_ratio, xavier_ratio)`` of each Linear/Conv weight.
        half_precision: Some trainable parameter is float16/bfloat16.
        optimizer: Optimizer class name, if known.
        lr: Largest learning rate of the optimizer's groups when inspected, if known.
        momentum: SGD momentum of the first group, if the optimizer has one.
        not_optimized: Module paths of layers with a trainable parameter that is in none of the
            optimizer's param groups (never updated), when the optimizer is known.
        remedies: Class names of the gradwatch remedies in use.
        clipping: A gradwatch remedy that clips is in use.
        amp: A GradScaler is in use.
    """

    activations: dict[str, Role] = field(default_factory=dict)
    activation_modules: dict[str, str] = field(default_factory=dict)
    has_norm: bool = False
    norms: set[str] = field(default_factory=set)
    residual: bool = False
    residual_evidence: tuple[str, ...] = ()
    recurrent: set[str] = field(default_factory=set)
    recurrent_radius: float | None = None
    recurrent_orthogonal: bool = False
    lstm_forget_bias: float | None = None
    depth: int = 0
    weight_layers: int = 0
    he_ratio: float | None = None
    xavier_ratio: float | None = None
    init_ratios: dict[str, tuple[float, float]] = field(default_factory=dict)
    half_precision: bool = False
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    not_optimized: set[str] = field(default_factory=set)
    remedies: set[str] = field(default_factory=set)
    clipping: bool = False
    amp: bool = False
    _optimizer: torch.optim.Optimizer | None = field(default=None, repr=False, compare=False)

    @classmethod
    def inspect(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        remedies: Iterable[Remedy] = (),
        scaler: object = None,
        initial: ModelProfile | None = None,
    ) -> ModelProfile:
        """Looks through ``model`` (and ``optimizer``) once, without running it.

        The initialisation (weight scale against He/Xavier, recurrent spectral radius, LSTM
        forget bias) is measured on the weights as they are now: call it before training, or pass
        the profile taken then as ``initial`` to keep its measurements (training, and a
        divergence, change the weights; advice is about how the model started).

        Residual structure is a heuristic on names, types and source: a module is a residual block
        when it is a ``nn.TransformerEncoderLayer``/``DecoderLayer``, its class name contains
        "Residual", "ResBlock", "Bottleneck"..., it has a child named ``downsample``/``shortcut``/
        ``skip``, or its ``forward`` source adds its input (or a variable named ``identity``,
        ``residual``, ``shortcut``...) to a call's result (``x + self.fc(x)``, ``out += identity``).
        :func:`gradwatch.audit` confirms it with a traced forward pass.

        Args:
            model: The (unwrapped) model.
            optimizer: Its optimizer, for the learning rate in advice.
            remedies: The gradwatch remedies in use (never advised again).
            scaler: The AMP GradScaler, if any.
            initial: An earlier profile of this model whose initialisation measurements are kept.

        Returns:
            The profile.
        """
        remedies = list(remedies)
        profile = cls(
            remedies={type(r).__name__ for r in remedies},
            clipping=any(r.clips for r in remedies),
            amp=scaler is not None,
        )
        residual_paths: list[str] = []
        weights: list[tuple[str, nn.Module, torch.Tensor]] = []
        optimized = (
            {id(p) for group in optimizer.param_groups for p in group["params"]}
            if optimizer is not None
            else None
        )
        for path, module in model.named_modules():
            name = type(module).__name__
            role = role_of(module)
            if role in (Role.SATURATING, Role.RECTIFIER, Role.LEAKY, Role.SMOOTH):
                profile.activations[name] = role
                profile.activation_modules[path] = name
            elif role is Role.NORMALISATION:
                profile.norms.add(name)
            elif role is Role.RECURRENT:
                profile.recurrent.add(name)
            if _is_residual_block(module):
                residual_paths.append(path)
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own and optimized is not None and any(id(p) not in optimized for p in own):
                profile.not_optimized.add(path)
            if own:
                profile.depth += 1
                profile.half_precision |= any(
                    p.dtype in (torch.float16, torch.bfloat16) for p in own
                )
            weight = getattr(module, "weight", None)
            if role is Role.WEIGHT and isinstance(weight, torch.Tensor):
                profile.weight_layers += 1
                if weight.dim() >= 2 and weight.device.type != "meta":
                    weights.append((path, module, weight))
        profile.has_norm = bool(profile.norms)
        profile.residual = bool(residual_paths)
        profile.residual_evidence = tuple(residual_paths)
        if initial is None:
            profile._measure_init(weights)
            profile._measure_recurrent(model)
        else:
            profile._keep_initial(initial)
        if optimizer is not None:
            profile._optimizer = optimizer
            profile.optimizer = type(optimizer).__name__
            profile.lr = _largest_lr(optimizer)
            momentum = optimizer.param_groups[0].get("momentum") if optimizer.param_groups else None
            profile.momentum = float(momentum) if isinstance(momentum, int | float) else None
        return profile

    def having(self, *roles: Role) -> set[str]:
        """Activation classes present with one of ``roles``."""
        return {name for name, role in self.activations.items() if role in roles}

    @property
    def saturating(self) -> set[str]:
        """Saturating activation classes present (Sigmoid, Tanh...)."""
        return self.having(Role.SATURATING)

    @property
    def he_scaled(self) -> bool | None:
        """Whether Linear/Conv weights have He (Kaiming) scale; None when unknown."""
        return None if self.he_ratio is None else INIT_BAND[0] <= self.he_ratio <= INIT_BAND[1]

    @property
    def plain_rnn(self) -> bool:
        """Whether the model has un-gated (Elman) recurrent cells."""
        return bool(self.recurrent & {"RNN", "RNNCell"})

    def current_lr(self) -> float | None:
        """The optimizer's largest learning rate now (schedulers move it), else ``lr``."""
        if self._optimizer is not None:
            lr = _largest_lr(self._optimizer)
            if lr is not None:
                return lr
        return self.lr

    def _measure_init(self, weights: list[tuple[str, nn.Module, torch.Tensor]]) -> None:
        # sharded weights are left out: each rank would measure its own shard and advise differently
        wholes = [(p, m, whole) for p, m, w in weights if (whole := held_whole(w)) is not None]
        wholes = [(p, m, w) for p, m, w in wholes if not w.is_complex()]  # He/Xavier: real weights
        if not wholes:
            return
        with torch.no_grad():
            stds = [
                _sample(w.detach()).float().std(unbiased=False).reshape(1) for _, _, w in wholes
            ]
            host = to_host([torch.cat([s.to(stds[0].device) for s in stds])])[0]
        he, xavier = [], []
        for (path, module, weight), std in zip(wholes, host, strict=True):
            fan_in, fan_out = weight_fans(module, weight)
            he_ratio = float(std) / math.sqrt(2.0 / fan_in)
            xavier_ratio = float(std) / math.sqrt(2.0 / (fan_in + fan_out))
            self.init_ratios[path] = (he_ratio, xavier_ratio)
            if std > 0:  # zero-initialised weights (e.g. residual branch outputs) are deliberate
                he.append(he_ratio)
                xavier.append(xavier_ratio)
        if he:
            self.he_ratio = float(np.median(he))
            self.xavier_ratio = float(np.median(xavier))

    def _keep_initial(self, initial: ModelProfile) -> None:
        self.he_ratio, self.xavier_ratio = initial.he_ratio, initial.xavier_ratio
        self.init_ratios = dict(initial.init_ratios)
        self.recurrent_radius = initial.recurrent_radius
        self.recurrent_orthogonal = initial.recurrent_orthogonal
        self.lstm_forget_bias = initial.lstm_forget_bias

    def _measure_recurrent(self, model: nn.Module) -> None:
        radii: list[float] = []
        orthogonal: list[bool] = []
        forget: list[float] = []
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, nn.RNNBase | nn.RNNCellBase):
                    continue
                kind = type(module).__name__
                for name, param in module.named_parameters(recurse=False):
                    whole = held_whole(param.detach())
                    if whole is None:  # a shard: rank-dependent, left out
                        continue
                    tensor = whole.float()
                    if kind in ("RNN", "RNNCell") and name.startswith("weight_hh"):
                        hidden = tensor.shape[-1]
                        if tensor.shape[0] == hidden <= MAX_EIG_SIZE:
                            radii.append(float(torch.linalg.eigvals(tensor).abs().max()))
                            orthogonal.append(_is_orthogonal(tensor))
                    if kind in ("LSTM", "LSTMCell") and name.startswith("bias_ih"):
                        partner = getattr(module, name.replace("bias_ih", "bias_hh"), None)
                        # gates are ordered input, forget, cell, output
                        gate = tensor.reshape(4, -1)[1]
                        if isinstance(partner, torch.Tensor):
                            partner_whole = held_whole(partner.detach())
                            if partner_whole is None:
                                continue
                            gate = gate + partner_whole.float().reshape(4, -1)[1]
                        forget.append(float(gate.mean()))
        if radii:
            self.recurrent_radius = max(radii)
            self.recurrent_orthogonal = all(orthogonal)
        if forget:
            self.lstm_forget_bias = float(np.mean(forget))


def _sample(weight: torch.Tensor) -> torch.Tensor:
    """``weight``'s elements, or an evenly strided sample of about ``INIT_SAMPLE`` of them."""
    flat = weight.reshape(-1)
    stride = flat.numel() // INIT_SAMPLE
    return flat[::stride] if stride > 1 else flat


def _largest_lr(optimizer: torch.optim.Optimizer) -> float | None:
    lrs = [g.get("lr") for g in optimizer.param_groups]
    values = [float(lr) for lr in lrs if isinstance(lr, int | float | torch.Tensor)]
    return max(values) if values else None


def _is_orthogonal(matrix: torch.Tensor) -> bool:
    gram = matrix @ matrix.T
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], device=gram.device)
    deviation = torch.linalg.matrix_norm(gram / scale - eye) / math.sqrt(gram.shape[0])
    return bool(deviation < ORTHOGONAL_TOLERANCE)


def _is_residual_block(module: nn.Module) -> bool:
    if isinstance(module, _BUILTIN_RESIDUAL):
        return True
    class_name = type(module).__name__.lower()
    if any(word in class_name for word in _RESIDUAL_CLASS_WORDS):
        return True
    if any(child in _RESIDUAL_CHILDREN for child, _ in module.named_children()):
        return True
    return not type(module).__module__.startswith("torch.") and _forward_adds_input(type(module))


def _forward_adds_input(module_class: type[nn.Module]) -> bool:
    """Whether ``forward``'s source adds its input (or a skip-named name) to a computed value."""
    known = _ADDS_INPUT.get(module_class)
    if known is None:
        known = _ADDS_INPUT[module_class] = _source_adds_input(module_class)
    return known


def _source_adds_input(module_class: type[nn.Module]) -> bool:
    """Whether ``forward`` adds a value that still is its input to a value computed by a
    submodule or method (``x + self.fc(x)``, ``LayerNorm(hidden + input_tensor)`` after
    ``hidden = self.dense(hidden)``, ``residual = x; ...; x = residual + x``, ``out += identity``,
    ``shortcut + self.drop_path(x)``).

    The statements of ``forward`` are read in order, tracking which names hold the input
    (arguments, their aliases and reshapes, the result of a ``self.shortcut``-like call) and which
    hold computed values (anything derived from a call on ``self``). Masks and biases added to
    attention scores (names with "mask", "bias", "position") are not inputs.
    """
    try:
        source = textwrap.dedent(pyinspect.getsource(module_class.forward))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return False
    function = tree.body[0] if tree.body else None
    if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    args = function.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)][1:]
    flow = _Flow({name for name in names if _may_be_input(name)})
    return any(flow.adds_input(statement) for statement in _statements(function.body))


class _Flow:
    """Which names of ``forward`` hold its input and which hold computed values, in order."""

    def __init__(self, inputs: set[str]) -> None:
        self.inputs = inputs | set(_SKIP_NAMES)
        self.computed: set[str] = set()

    def adds_input(self, statement: ast.stmt) -> bool:
        """Whether ``statement`` adds an input to a computed value; then updates the names."""
        found = False
        if isinstance(statement, ast.AugAssign) and isinstance(statement.op, ast.Add):
            target = statement.target
            found = (self.is_input(target) and self.computes(statement.value)) or (
                self.computes(target) and self.is_input(statement.value)
            )
        parts = [v for v in (getattr(statement, "value", None),) if isinstance(v, ast.AST)]
        for node in (n for part in parts for n in ast.walk(part)):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                left, right = node.left, node.right
                if (self.is_input(left) and self.computes(right)) or (
                    self.is_input(right) and self.computes(left)
                ):
                    found = True
        self.track(statement)
        return found

    def is_input(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id in self.inputs

    def derives_input(self, node: ast.AST) -> bool:
        """``x``, ``x.view(...)``, ``x[:, 0]``, ``torch.flatten(x, 1)``: still the input."""
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and self.derives_input(func.value):
                return True
            return bool(node.args) and self.derives_input(node.args[0])
        if isinstance(node, ast.Attribute | ast.Subscript):
            return self.derives_input(node.value)
        return self.is_input(node)

    def computes(self, node: ast.AST) -> bool:
        """A call on ``self`` (a submodule or method) or a computed name is in ``node``."""
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and child.id in self.computed:
                return True
            if isinstance(child, ast.Call) and _rooted_at_self(child.func):
                return True
        return False

    def track(self, statement: ast.stmt) -> None:
        if isinstance(statement, ast.Assign):
            targets: list[ast.expr] = list(statement.targets)
            value: ast.expr | None = statement.value
        elif isinstance(statement, ast.AnnAssign | ast.AugAssign):
            targets, value = [statement.target], statement.value
        else:
            return
        assigned = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if value is None:
            return
        if isinstance(statement, ast.AugAssign) and self.computes(value):
            kind = "computed"
        elif _skip_call(value) or (not self.computes(value) and self.derives_input(value)):
            kind = "input"  # an alias, a reshape of the input, or a shortcut projection
        elif self.computes(value):
            kind = "computed"
        else:
            kind = "other"
        self.inputs -= assigned
        self.computed -= assigned
        if kind == "input":
            self.inputs |= {name for name in assigned if _may_be_input(name)}
        elif kind == "computed":
            self.computed |= assigned


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Simple statements in source order, inside ``if``/``for``/``with``/``try`` blocks too."""
    for statement in body:
        blocks = [
            getattr(statement, field, None) for field in ("body", "orelse", "finalbody", "handlers")
        ]
        nested = [b for b in blocks if isinstance(b, list) and b]
        if not nested:
            yield statement
        for block in nested:
            for item in block:
                if isinstance(item, ast.ExceptHandler):
                    yield from _statements(item.body)
                elif isinstance(item, ast.stmt):
                    yield from _statements([item])


def _may_be_input(name: str) -> bool:
    lowered = name.lower()
    return not any(word in lowered for word in ("mask", "bias", "position"))


def _rooted_at_self(node: ast.expr) -> bool:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "self"


def _skip_call(node: ast.expr) -> bool:
    """``self.shortcut(x)``, ``self.downsample(x)``...: a projection on the skip path."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and _rooted_at_self(node.func)
        and any(word in node.func.attr.lower() for word in _RESIDUAL_CHILDREN)
    )
