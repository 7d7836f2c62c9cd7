"""Advice: what the model contains, and the remedies that fit it for each alert kind.

:meth:`ModelProfile.inspect` looks through a model once (no forward pass) and :func:`advise` turns
an alert kind into short imperative remedies that apply to *that* model: a remedy the model already
has (normalisation layers, He-scaled weights, gated recurrent cells, residual connections, a
clipping remedy) is never suggested.
"""

from __future__ import annotations

import ast
import inspect as pyinspect
import math
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch.alerts import AlertKind
from gradwatch.distributed import held_whole
from gradwatch.transfer import to_host

SATURATING = frozenset({"Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Softsign", "LogSigmoid"})
"""Activations with flat regions where the derivative is ~0."""

RELU_LIKE = frozenset({"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU"})
"""Piecewise-linear activations: He (Kaiming) initialisation is their natural scale."""

_DEAD_PRONE = frozenset({"ReLU", "ReLU6"})
_ACTIVATIONS = SATURATING | RELU_LIKE | {"GELU", "SiLU", "Mish", "Softplus", "Tanhshrink"}
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_WEIGHT_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
_BUILTIN_RESIDUAL = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# Class-name fragments and child names that mark a residual block (ResNet, pre-LN transformers...).
_RESIDUAL_CLASS_WORDS = ("residual", "resblock", "resnet", "bottleneck", "basicblock")
_RESIDUAL_CHILDREN = frozenset({"downsample", "shortcut", "skip", "residual", "res_proj"})
# Names that, added to something computed in ``forward``, mark a skip connection in its source.
_SKIP_NAMES = frozenset({"identity", "residual", "shortcut", "skip"})

# Weights are "He-scaled" (or "Xavier-scaled") when the median ratio of their std to that scheme's
# std lies in this band. PyTorch's default Linear/Conv init gives 1/sqrt(6) ~ 0.41 of He scale.
_INIT_BAND = (0.7, 1.45)
# A weight std this many times the He std makes activations grow layer by layer.
_INIT_TOO_LARGE = 1.5
# A network with at least this many Linear/Conv layers in a chain counts as deep.
DEEP_LAYERS = 10
# Largest recurrent matrix whose eigenvalues inspect computes (cost grows with hidden_size ** 3).
_MAX_EIG_SIZE = 1024
# A recurrent matrix with ||W W^T / c - I||_F / sqrt(H) below this is orthogonal up to the scale c.
_ORTHOGONAL_TOLERANCE = 0.1
# LSTM forget-gate biases (b_ih + b_hh) averaging at least this count as "initialised to ~1".
_FORGET_BIAS_SET = 0.5
_CLIPPING_REMEDIES = frozenset({"ClipNorm", "AutoClip", "ZClip", "AGC"})
_ADDS_INPUT: dict[type[nn.Module], bool] = {}  # per class: its forward source adds its input


@dataclass
class ModelProfile:
    """What a model contains, inspected once.

    Attributes:
        activations: Class names of activation modules (``"Sigmoid"``, ``"ReLU"``...). Functional
            activations (``torch.tanh`` in ``forward``) are invisible to this inspection.
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
        remedies: Class names of the gradwatch remedies in use.
        amp: A GradScaler is in use.
    """

    activations: set[str] = field(default_factory=set)
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
    remedies: set[str] = field(default_factory=set)
    amp: bool = False
    _optimizer: torch.optim.Optimizer | None = field(default=None, repr=False, compare=False)

    @classmethod
    def inspect(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        remedies: Iterable[object] = (),
        scaler: object = None,
    ) -> ModelProfile:
        """Looks through ``model`` (and ``optimizer``) once, without running it.

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

        Returns:
            The profile.
        """
        profile = cls(remedies={type(r).__name__ for r in remedies}, amp=scaler is not None)
        residual_paths: list[str] = []
        weights: list[tuple[str, torch.Tensor]] = []
        for path, module in model.named_modules():
            name = type(module).__name__
            if name in _ACTIVATIONS:
                profile.activations.add(name)
                profile.activation_modules[path] = name
            if isinstance(module, _NORMS):
                profile.norms.add(name)
            if isinstance(module, nn.RNNBase | nn.RNNCellBase):
                profile.recurrent.add(name)
            if _is_residual_block(module):
                residual_paths.append(path)
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                profile.depth += 1
                profile.half_precision |= any(
                    p.dtype in (torch.float16, torch.bfloat16) for p in own
                )
            weight = getattr(module, "weight", None)
            if isinstance(module, _WEIGHT_LAYERS) and isinstance(weight, torch.Tensor):
                profile.weight_layers += 1
                if weight.dim() >= 2:
                    weights.append((path, weight))
        profile.has_norm = bool(profile.norms)
        profile.residual = bool(residual_paths)
        profile.residual_evidence = tuple(residual_paths)
        profile._measure_init(weights)
        profile._measure_recurrent(model)
        if optimizer is not None:
            profile._optimizer = optimizer
            profile.optimizer = type(optimizer).__name__
            profile.lr = _largest_lr(optimizer)
            momentum = optimizer.param_groups[0].get("momentum") if optimizer.param_groups else None
            profile.momentum = float(momentum) if isinstance(momentum, int | float) else None
        return profile

    @property
    def saturating(self) -> set[str]:
        """Saturating activation classes present (Sigmoid, Tanh...)."""
        return self.activations & SATURATING

    @property
    def he_scaled(self) -> bool | None:
        """Whether Linear/Conv weights have He (Kaiming) scale; None when unknown."""
        return None if self.he_ratio is None else _INIT_BAND[0] <= self.he_ratio <= _INIT_BAND[1]

    @property
    def plain_rnn(self) -> bool:
        """Whether the model has un-gated (Elman) recurrent cells."""
        return bool(self.recurrent & {"RNN", "RNNCell"})

    @property
    def clipping(self) -> bool:
        """Whether a gradwatch clipping remedy is in use."""
        return bool(self.remedies & _CLIPPING_REMEDIES)

    def current_lr(self) -> float | None:
        """The optimizer's largest learning rate now (schedulers move it), else ``lr``."""
        if self._optimizer is not None:
            lr = _largest_lr(self._optimizer)
            if lr is not None:
                return lr
        return self.lr

    def _measure_init(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # sharded weights are left out: each rank would measure its own shard and advise differently
        weights = [(path, whole) for path, w in weights if (whole := held_whole(w)) is not None]
        if not weights:
            return
        with torch.no_grad():
            stds = [w.detach().float().std(unbiased=False).reshape(1) for _, w in weights]
            host = to_host([torch.cat([s.to(stds[0].device) for s in stds])])[0]
        he, xavier = [], []
        for (path, weight), std in zip(weights, host, strict=True):
            fan_in, fan_out = _fans(weight)
            he_ratio = float(std) / math.sqrt(2.0 / fan_in)
            xavier_ratio = float(std) / math.sqrt(2.0 / (fan_in + fan_out))
            self.init_ratios[path] = (he_ratio, xavier_ratio)
            if std > 0:  # zero-initialised weights (e.g. residual branch outputs) are deliberate
                he.append(he_ratio)
                xavier.append(xavier_ratio)
        if he:
            self.he_ratio = float(np.median(he))
            self.xavier_ratio = float(np.median(xavier))

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
                        if tensor.shape[0] == hidden <= _MAX_EIG_SIZE:
                            radii.append(float(torch.linalg.eigvals(tensor).abs().max()))
                            orthogonal.append(_is_orthogonal(tensor))
                    if kind in ("LSTM", "LSTMCell") and name.startswith("bias_ih"):
                        partner = getattr(module, name.replace("bias_ih", "bias_hh"), None)
                        gate = tensor.reshape(4, -1)[
                            1
                        ]  # gates are ordered input, forget, cell, output
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


def advise(
    kind: AlertKind, profile: ModelProfile, *, layers: Iterable[str] = ()
) -> tuple[str, ...]:
    """Remedies that fit ``profile`` for an alert of ``kind``, most effective first.

    Args:
        kind: The alert kind.
        profile: What the model contains.
        layers: The layers (or activation modules) the alert names; saturation and dead-unit advice
            then names only the activation types found there.

    Returns:
        Short imperative sentences; empty when nothing applies.
    """
    named = {profile.activation_modules[n] for n in layers if n in profile.activation_modules}
    builder = _ADVICE.get(kind)
    return tuple(dict.fromkeys(builder(profile, named))) if builder is not None else ()


def _vanishing(profile: ModelProfile, named: set[str]) -> list[str]:
    out = []
    if profile.saturating:
        out.append(f"replace {_join(profile.saturating)} with ReLU/GELU")
    if profile.recurrent:
        out += _recurrent_advice(profile)
    else:
        if not profile.has_norm:
            out.append("add BatchNorm/LayerNorm")
        if profile.he_scaled is False:
            out.append("use He (Kaiming) initialisation")
    if profile.weight_layers >= DEEP_LAYERS and not profile.residual:
        out.append("add residual (skip) connections")
    return out


def _divergence(profile: ModelProfile, named: set[str]) -> list[str]:
    out = [_lower_lr(profile)]
    if not profile.clipping:
        out.append("enable gw.ZClip")
    if profile.optimizer is not None and "LRBackoff" not in profile.remedies:
        out.append("enable gw.LRBackoff")
    return out


def _exploding(profile: ModelProfile, named: set[str]) -> list[str]:
    out = [_lower_lr(profile)]
    if not profile.clipping:
        out.append("clip gradients (gw.ClipNorm / gw.ZClip)")
    if profile.recurrent:
        out += _recurrent_advice(profile)
    elif not profile.has_norm:
        out.append("add BatchNorm/LayerNorm")
    if profile.he_ratio is not None and profile.he_ratio > _INIT_TOO_LARGE:
        out.append("shrink the initial weights to He/Xavier scale")
    return out


def _nonfinite(profile: ModelProfile, named: set[str]) -> list[str]:
    out = [_lower_lr(profile), "check the loss for log(0) or division by zero (add an eps)"]
    if "SkipStep" not in profile.remedies:
        out.append("skip poisoned steps (gw.SkipStep)")
    if not profile.clipping:
        out.append("clip gradients (gw.ClipNorm / gw.ZClip)")
    if profile.half_precision:
        out.append("keep weights in float32 and train with torch.autocast")
    elif profile.amp:
        out.append("autocast to bfloat16 instead of float16")
    return out


def _saturation(profile: ModelProfile, named: set[str]) -> list[str]:
    out = []
    saturating = (named & SATURATING) or profile.saturating
    if saturating:
        out.append(f"replace {_join(saturating)} with ReLU/GELU")
    if not profile.has_norm and not profile.recurrent:
        out.append("add BatchNorm/LayerNorm")
    if profile.xavier_ratio is not None and profile.xavier_ratio > _INIT_TOO_LARGE:
        out.append("shrink the initial weights to Xavier (Glorot) scale")
    out.append(_lower_lr(profile))
    return out


def _dead_units(profile: ModelProfile, named: set[str]) -> list[str]:
    out = []
    dead_prone = (named & _DEAD_PRONE) or (profile.activations & _DEAD_PRONE)
    if dead_prone:
        out.append(f"replace {_join(dead_prone)} with LeakyReLU/GELU")
    out.append(_lower_lr(profile))
    if not profile.recurrent:
        if profile.he_scaled is False:
            out.append("use He (Kaiming) initialisation")
        if not profile.has_norm:
            out.append("add BatchNorm/LayerNorm")
    return out


def _stagnation(profile: ModelProfile, named: set[str]) -> list[str]:
    lr = profile.current_lr()
    out = [
        f"raise the learning rate (now {lr:.3g} for {profile.optimizer}) or check its schedule"
        if lr is not None
        else "raise the learning rate or check its schedule"
    ]
    if profile.optimizer == "SGD" and not profile.momentum:
        out.append("use SGD momentum (0.9) or AdamW")
    if profile.saturating:
        out.append(f"replace {_join(profile.saturating)} with ReLU/GELU")
    if profile.he_scaled is False and not profile.recurrent:
        out.append("use He (Kaiming) initialisation")
    return out


_ADVICE = {
    AlertKind.VANISHING: _vanishing,
    AlertKind.EXPLODING: _exploding,
    AlertKind.SPIKE: _divergence,
    AlertKind.NONFINITE: _nonfinite,
    AlertKind.SATURATION: _saturation,
    AlertKind.DEAD_UNITS: _dead_units,
    AlertKind.STAGNATION: _stagnation,
}


def _recurrent_advice(profile: ModelProfile) -> list[str]:
    out = []
    if profile.plain_rnn:
        out.append("use LSTM/GRU")
        radius = profile.recurrent_radius
        if not profile.recurrent_orthogonal:
            out.append("orthogonal init of the recurrent matrix (nn.init.orthogonal_)")
        elif radius is not None and radius > 1.05:
            out.append(f"rescale the recurrent matrix to spectral radius <= 1 (now {radius:.2g})")
    if "LSTM" in profile.recurrent or "LSTMCell" in profile.recurrent:
        bias = profile.lstm_forget_bias
        if bias is not None and bias < _FORGET_BIAS_SET:
            out.append("set the LSTM forget-gate bias to 1")
    out.append("truncate BPTT (shorter sequences)")
    if not profile.clipping:
        out.append("clip gradients (gw.ClipNorm / gw.ZClip)")
    return out


def _lower_lr(profile: ModelProfile) -> str:
    lr = profile.current_lr()
    if lr is None:
        return "lower the learning rate"
    return f"lower the learning rate (now {lr:.3g} for {profile.optimizer})"


def _join(names: Iterable[str]) -> str:
    return "/".join(sorted(names))


def _largest_lr(optimizer: torch.optim.Optimizer) -> float | None:
    lrs = [g.get("lr") for g in optimizer.param_groups]
    values = [float(lr) for lr in lrs if isinstance(lr, int | float | torch.Tensor)]
    return max(values) if values else None


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return max(weight.shape[1] * receptive, 1), max(weight.shape[0] * receptive, 1)


def _is_orthogonal(matrix: torch.Tensor) -> bool:
    gram = matrix @ matrix.T
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], device=gram.device)
    deviation = torch.linalg.matrix_norm(gram / scale - eye) / math.sqrt(gram.shape[0])
    return bool(deviation < _ORTHOGONAL_TOLERANCE)


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
    try:
        source = textwrap.dedent(pyinspect.getsource(module_class.forward))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return False
    function = tree.body[0] if tree.body else None
    if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    arguments = [a.arg for a in function.args.args[1:2]]  # the first argument after self
    skip_names = _SKIP_NAMES | set(arguments)
    for node in ast.walk(function):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Add)
            and _skip_pair(node.left, node.right, skip_names)
        ):
            return True
        if (
            isinstance(node, ast.AugAssign)
            and isinstance(node.op, ast.Add)
            and (
                _is_name(node.value, skip_names)
                or (_is_name(node.target, skip_names) and _has_call(node.value))
            )
        ):
            return True
    return False


def _skip_pair(left: ast.expr, right: ast.expr, skip_names: set[str] | frozenset[str]) -> bool:
    return (
        (_is_name(left, skip_names) and _has_call(right))
        or (_is_name(right, skip_names) and _has_call(left))
        or _is_name(left, _SKIP_NAMES)
        or _is_name(right, _SKIP_NAMES)
    )


def _is_name(node: Any, names: set[str] | frozenset[str]) -> bool:
    return isinstance(node, ast.Name) and node.id in names


def _has_call(node: ast.expr) -> bool:
    return any(isinstance(n, ast.Call) for n in ast.walk(node))
