"""The one registry of module roles: which modules are activations (and of what kind),
normalisation, recurrent, embedding or weight layers.

Activation monitoring, the model profile behind advice, the audit and the detectors all ask this
module, so they always agree. A module's role is looked up by its class and the classes it derives
from (torch's own modules are registered by type); a library activation that does not derive from
a torch class (``transformers``' ``GELUActivation``, timm's ``GELUTanh``...) is recognised by its
class name when it is a parameter-free leaf module.
"""

from __future__ import annotations

import enum

import torch
from torch import nn


class Role(str, enum.Enum):
    """What a module does, as far as gradients are concerned."""

    SATURATING = "saturating"
    """Bounded activation with flat regions (sigmoid, tanh...): gradients vanish there."""
    RECTIFIER = "rectifier"
    """ReLU-like with an exact zero region: units can die."""
    LEAKY = "leaky"
    """Piecewise-linear without a dead region (LeakyReLU, ELU, SELU...)."""
    SMOOTH = "smooth"
    """Smooth non-saturating activation (GELU, SiLU, Mish, Softplus...)."""
    NORMALISATION = "normalisation"
    RECURRENT = "recurrent"
    EMBEDDING = "embedding"
    WEIGHT = "weight"
    """A Linear/Bilinear/Conv layer (its weight has an input and an output fan)."""


ACTIVATION_ROLES = frozenset({Role.SATURATING, Role.RECTIFIER, Role.LEAKY, Role.SMOOTH})
HE_INIT_ROLES = frozenset({Role.RECTIFIER, Role.LEAKY})
"""Activations whose natural initialisation scale is He (Kaiming)."""

_BY_TYPE: dict[type[nn.Module], Role] = {
    nn.Sigmoid: Role.SATURATING,
    nn.Tanh: Role.SATURATING,
    nn.Hardsigmoid: Role.SATURATING,
    nn.Softsign: Role.SATURATING,
    nn.LogSigmoid: Role.SATURATING,
    nn.ReLU6: Role.RECTIFIER,  # before Hardtanh: ReLU6 derives from it
    nn.Hardtanh: Role.SATURATING,
    nn.ReLU: Role.RECTIFIER,
    nn.LeakyReLU: Role.LEAKY,
    nn.PReLU: Role.LEAKY,
    nn.RReLU: Role.LEAKY,
    nn.ELU: Role.LEAKY,
    nn.CELU: Role.LEAKY,
    nn.SELU: Role.LEAKY,
    nn.GELU: Role.SMOOTH,
    nn.SiLU: Role.SMOOTH,
    nn.Mish: Role.SMOOTH,
    nn.Softplus: Role.SMOOTH,
    nn.Hardswish: Role.SMOOTH,
    nn.Tanhshrink: Role.SMOOTH,
    nn.modules.batchnorm._NormBase: Role.NORMALISATION,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm: Role.NORMALISATION,
    nn.GroupNorm: Role.NORMALISATION,
    nn.LocalResponseNorm: Role.NORMALISATION,
    nn.RNNBase: Role.RECURRENT,
    nn.RNNCellBase: Role.RECURRENT,
    nn.Embedding: Role.EMBEDDING,
    nn.EmbeddingBag: Role.EMBEDDING,
    nn.Linear: Role.WEIGHT,
    nn.Bilinear: Role.WEIGHT,
    nn.modules.conv._ConvNd: Role.WEIGHT,
}
if hasattr(nn, "RMSNorm"):
    _BY_TYPE[nn.RMSNorm] = Role.NORMALISATION

# Class-name fragments of library modules, checked in order: ``gelu`` before ``elu`` and before
# ``tanh`` (``GELUTanh``, ``PytorchGELUTanh`` are the tanh approximation of GELU, not saturating),
# ``hardswish`` before ``sigmoid``...
_BY_NAME: tuple[tuple[str, Role], ...] = (
    ("layernorm", Role.NORMALISATION),
    ("rmsnorm", Role.NORMALISATION),
    ("batchnorm", Role.NORMALISATION),
    ("groupnorm", Role.NORMALISATION),
    ("gelu", Role.SMOOTH),
    ("silu", Role.SMOOTH),
    ("swish", Role.SMOOTH),
    ("mish", Role.SMOOTH),
    ("softplus", Role.SMOOTH),
    ("sigmoid", Role.SATURATING),
    ("softsign", Role.SATURATING),
    ("tanh", Role.SATURATING),
    ("laplace", Role.SATURATING),  # transformers' LaplaceActivation: a CDF, range (0, 1)
    ("leakyrelu", Role.LEAKY),
    ("prelu", Role.LEAKY),
    ("relu", Role.RECTIFIER),  # before ``elu``: ReLUSquared, ReLU6-like names
    ("selu", Role.LEAKY),
    ("celu", Role.LEAKY),
    ("elu", Role.LEAKY),
)
_cache: dict[type[nn.Module], Role | None] = {}


def role_of(module: nn.Module) -> Role | None:
    """The role of ``module``, None when it has none of interest (a container, a custom block).

    Example:
        >>> role_of(nn.ReLU6()), role_of(nn.LayerNorm(4)), role_of(nn.Sequential())
        (<Role.RECTIFIER: 'rectifier'>, <Role.NORMALISATION: 'normalisation'>, None)
    """
    cls = type(module)
    if cls not in _cache:
        _cache[cls] = _role_by_type(cls)
    role = _cache[cls]
    if role is None and _is_parameter_free_leaf(module):
        role = _role_by_name(cls.__name__)
    elif role is None and cls.__name__.lower().endswith(("layernorm", "rmsnorm")):
        role = Role.NORMALISATION  # LlamaRMSNorm, T5LayerNorm... own a gain parameter
    return role


def activation_role(module: nn.Module) -> Role | None:
    """The activation role of ``module``, None when it is not an activation module."""
    role = role_of(module)
    return role if role in ACTIVATION_ROLES else None


def output_range(module: nn.Module) -> tuple[float, float]:
    """``(low, high)`` bounds of a saturating activation's output (``-inf`` when unbounded)."""
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    name = type(module).__name__.lower()
    if "logsigmoid" in name:
        return float("-inf"), 0.0
    if "sigmoid" in name or "laplace" in name:
        return 0.0, 1.0
    return -1.0, 1.0  # tanh, softsign


def weight_fans(module: nn.Module, weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight layer's weight (``transformers``' Conv1D is transposed)."""
    receptive = 1
    for size in weight.shape[2:]:
        receptive *= size
    rows, columns = weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1
    if type(module).__name__ == "Conv1D" and weight.dim() == 2:  # [in, out]
        rows, columns = columns, rows
    return max(columns * receptive, 1), max(rows * receptive, 1)


def is_weight_layer(module: nn.Module) -> bool:
    """A Linear/Bilinear/Conv layer (or ``transformers``' GPT-2 ``Conv1D``)."""
    return role_of(module) is Role.WEIGHT or type(module).__name__ == "Conv1D"


def _role_by_type(cls: type[nn.Module]) -> Role | None:
    for base in cls.__mro__:
        role = _BY_TYPE.get(base)
        if role is not None:
            return role
    return None


def _role_by_name(name: str) -> Role | None:
    lowered = name.lower()
    for fragment, role in _BY_NAME:
        if fragment in lowered:
            return role
    return None


def _is_parameter_free_leaf(module: nn.Module) -> bool:
    return not module._modules and not module._parameters
