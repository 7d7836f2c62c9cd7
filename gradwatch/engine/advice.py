"""Advice: the remedies that fit *this* model for each alert kind.

:func:`advise` turns an alert kind into short imperative remedies chosen from the model's
:class:`~gradwatch.engine.profile.ModelProfile`: a remedy the model already has (normalisation
layers, He-scaled weights, gated recurrent cells, residual connections, a clipping remedy) is never
suggested.
"""

from __future__ import annotations

from collections.abc import Iterable

from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.origin import Origin
from gradwatch.engine.profile import ModelProfile
from gradwatch.engine.roles import Role
from gradwatch.engine.thresholds import DEEP_LAYERS, FORGET_BIAS_SET, INIT_TOO_LARGE


def advise(
    kind: AlertKind,
    profile: ModelProfile,
    *,
    layers: Iterable[str] = (),
    value: float | None = None,
) -> tuple[str, ...]:
    """Remedies that fit ``profile`` for an alert of ``kind``, most effective first.

    Args:
        kind: The alert kind.
        profile: What the model contains.
        layers: The layers (or modules) the alert names; saturation and dead-unit advice then
            names only the activation types found there, non-finite advice the module.
        value: The alert's value: for ``NONFINITE`` its :class:`~gradwatch.engine.origin.Origin`
            (advice per origin), else unused.

    Returns:
        Short imperative sentences; empty when nothing applies.
    """
    layers = list(layers)
    if kind is AlertKind.NONFINITE:
        return tuple(dict.fromkeys(_nonfinite(profile, _origin(value), layers)))
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
    if profile.he_ratio is not None and profile.he_ratio > INIT_TOO_LARGE:
        out.append("shrink the initial weights to He/Xavier scale")
    return out


def _nonfinite(profile: ModelProfile, origin: Origin | None, layers: list[str]) -> list[str]:
    """Advice for a NaN/Inf by where it came from (None: unknown, e.g. an old alert)."""
    out = []
    if origin is Origin.INPUT:
        out.append(
            "fix the data pipeline: a batch entering the model holds NaN/Inf (missing values, a "
            "division by zero in normalisation, a corrupt sample); check torch.isfinite(batch)"
        )
    elif origin is Origin.FORWARD:
        named = layers and layers[0]
        where = f"in the forward of {layers[0]!r}" if named else "in the forward pass"
        out.append(
            f"look {where} for log/sqrt of non-positive values, division by zero or overflow "
            "(add an eps, clamp, or compute it in float32), or for NaN/Inf weights left by an "
            "earlier update"
        )
    elif origin is Origin.LOSS:
        out.append(
            "check the loss for log(0) or division by zero (add an eps, or use a fused loss such "
            "as F.cross_entropy / BCEWithLogitsLoss) and the targets for NaN/Inf"
        )
    else:
        if origin is None:
            out.append("check the loss for log(0) or division by zero (add an eps)")
        out.append(_lower_lr(profile))
        if not profile.clipping:
            out.append("clip gradients (gw.ClipNorm / gw.ZClip)")
    if "SkipStep" not in profile.remedies:
        out.append("skip poisoned steps (gw.SkipStep)")
    if origin in (Origin.FORWARD, Origin.BACKWARD, None):
        if profile.half_precision:
            out.append("keep weights in float32 and train with torch.autocast")
        elif profile.amp:
            out.append("autocast to bfloat16 instead of float16")
    return out


def _origin(value: float | None) -> Origin | None:
    if value is None or value not in (0.0, 1.0, 2.0, 3.0):
        return None
    return Origin(int(value))


def _saturation(profile: ModelProfile, named: set[str]) -> list[str]:
    out = []
    saturating = (named & profile.saturating) or profile.saturating
    if saturating:
        out.append(f"replace {_join(saturating)} with ReLU/GELU")
    if not profile.has_norm and not profile.recurrent:
        out.append("add BatchNorm/LayerNorm")
    if profile.xavier_ratio is not None and profile.xavier_ratio > INIT_TOO_LARGE:
        out.append("shrink the initial weights to Xavier (Glorot) scale")
    out.append(_lower_lr(profile))
    return out


def _dead_units(profile: ModelProfile, named: set[str]) -> list[str]:
    out = []
    rectifiers = profile.having(Role.RECTIFIER)
    dead_prone = (named & rectifiers) or rectifiers
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
        if bias is not None and bias < FORGET_BIAS_SET:
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
