"""Advice: the remedies that fit *this* model for each alert kind.

:func:`advise` turns an alert kind into short imperative remedies chosen from the model's
:class:`~gradwatch.engine.profile.ModelProfile`: a remedy the model already has (normalisation
layers, He-scaled weights, gated recurrent cells, residual connections, a clipping remedy) is never
suggested.

Advice agrees with itself across a run. An alert that usually follows a divergence (vanishing,
saturation, dead units, stagnation after exploding gradients, a spike or a NaN) points back at it
(:func:`root_cause`) instead of giving advice of its own that contradicts it ("raise the learning
rate" after "lower the learning rate"); :func:`merge_advice` merges the advice of a run's alerts
and drops what contradicts the rest; :func:`explain` tells the sequence as one story. "Raise the
learning rate" is never given for layers whose gradient is exactly zero (no learning rate helps)
or whose parameters are in no optimizer param group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gradwatch.engine.alerts import Alert, AlertKind
from gradwatch.engine.origin import Origin
from gradwatch.engine.profile import ModelProfile
from gradwatch.engine.roles import Role
from gradwatch.engine.text import format_layers
from gradwatch.engine.thresholds import DEEP_LAYERS, FORGET_BIAS_SET, INIT_TOO_LARGE

DIVERGENCE = frozenset({AlertKind.EXPLODING, AlertKind.SPIKE, AlertKind.NONFINITE})
"""Alert kinds of a run going out of range (lower the learning rate, clip)."""
AFTERMATH = frozenset(
    {
        AlertKind.VANISHING,
        AlertKind.SATURATION,
        AlertKind.DEAD_UNITS,
        AlertKind.ZERO_GRAD,
        AlertKind.STAGNATION,
    }
)
"""Alert kinds that a divergence commonly leaves behind: weights blown up push units into flat
or dead regions, gradients then vanish and updates stall."""


def advise(
    kind: AlertKind,
    profile: ModelProfile,
    *,
    layers: Iterable[str] = (),
    value: float | None = None,
    earlier: Sequence[Alert] = (),
    zero_gradients: Iterable[str] = (),
) -> tuple[str, ...]:
    """Remedies that fit ``profile`` for an alert of ``kind``, most effective first.

    Args:
        kind: The alert kind.
        profile: What the model contains.
        layers: The layers (or modules) the alert names; saturation and dead-unit advice then
            names only the activation types found there, non-finite advice the module.
        value: The alert's value: for ``NONFINITE`` its :class:`~gradwatch.engine.origin.Origin`
            (advice per origin), else unused.
        earlier: The run's alerts before this one: after a divergence, an aftermath alert points
            back at it (see :func:`root_cause`).
        zero_gradients: Layers whose gradient was exactly zero over the detection: no learning
            rate moves them.

    Returns:
        Short imperative sentences; empty when nothing applies.
    """
    layers = list(layers)
    if kind is AlertKind.NONFINITE:
        items = _nonfinite(profile, _origin(value), layers)
    elif kind is AlertKind.STAGNATION:
        items = _stagnation(profile, layers, set(zero_gradients))
    else:
        named = {profile.activation_modules[n] for n in layers if n in profile.activation_modules}
        builder = _ADVICE.get(kind)
        items = builder(profile, named) if builder is not None else []
    cause = root_cause(kind, earlier)
    if cause is not None:
        pointer = (
            f"{_FIRST_FIX} {cause.kind.value} alert of step {cause.step} (its advice): "
            f"{kind.value} after a divergence is usually its consequence"
        )
        items = [pointer] + [item for item in items if not _speeds_up(item)]
    return tuple(dict.fromkeys(items))


def root_cause(kind: AlertKind, earlier: Sequence[Alert]) -> Alert | None:
    """The first divergence (warning or error) among ``earlier`` alerts, when ``kind`` is one that
    commonly follows it; else None."""
    if kind not in AFTERMATH:
        return None
    return next((a for a in earlier if a.kind in DIVERGENCE and a.severity != "info"), None)


def merge_advice(alerts: Sequence[Alert]) -> tuple[str, ...]:
    """The advice of ``alerts`` in order, once each, without contradictions: when some advice
    lowers the learning rate, none raises it (a run that diverged does not need a larger one)."""
    items = [
        item
        for item in dict.fromkeys(item for alert in alerts for item in alert.advice)
        if not item.startswith(_FIRST_FIX)  # the story says it once (see explain)
    ]
    if any(_lowers_lr(item) for item in items):
        items = [item for item in items if not _speeds_up(item)]
    return tuple(items)


def explain(alerts: Sequence[Alert]) -> str | None:
    """One sentence linking a divergence to the alerts that followed it, None without such a
    sequence.

    Example:
        >>> a = Alert(AlertKind.EXPLODING, 0, ("rnn",), 1e3, 50.0, "warning", "...")
        >>> b = Alert(AlertKind.VANISHING, 263, ("rnn",), 0.007, 0.01, "warning", "...")
        >>> print(explain([a, b]))  # doctest: +NORMALIZE_WHITESPACE
        exploding at step 0 came first; the vanishing (from step 263) that followed is likely its
        consequence: fix the exploding first
    """
    warnings = [a for a in alerts if a.severity != "info"]
    cause = next((a for a in warnings if a.kind in DIVERGENCE), None)
    if cause is None:
        return None
    after = [a for a in warnings if a.kind in AFTERMATH and a.step >= cause.step]
    if not after:
        return None
    named = [f"{a.kind.value} (from step {a.step})" for a in after]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    verb, noun = ("is", "consequence") if len(after) == 1 else ("are", "consequences")
    return (
        f"{cause.kind.value} at step {cause.step} came first; the {listed} that followed "
        f"{verb} likely its {noun}: fix the {cause.kind.value} first"
    )


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


def _zero_grad(profile: ModelProfile, named: set[str]) -> list[str]:
    out = [
        "no gradient reaches these layers (exactly zero): look for a ReLU layer after them whose "
        "units all died, a .detach()/torch.no_grad() between them and the loss, or an output of "
        "theirs that the loss does not use"
    ]
    rectifiers = profile.having(Role.RECTIFIER)
    if rectifiers:
        out.append(f"replace {_join(rectifiers)} with LeakyReLU/GELU (they cannot die)")
    if not profile.has_norm and not profile.recurrent:
        out.append("add BatchNorm/LayerNorm before the ReLUs")
    return out


def _stagnation(profile: ModelProfile, layers: list[str], zero: set[str]) -> list[str]:
    outside = [name for name in layers if name in profile.not_optimized]
    silent = [name for name in layers if name in zero and name not in outside]
    out = []
    if outside:
        out.append(
            f"add the parameters of {format_layers(outside)} to the optimizer (they are in no "
            "param group), or set requires_grad=False if they are meant to stay frozen"
        )
    if silent:
        out.append(
            f"no gradient reaches {format_layers(silent)} (exactly zero): look for a dead ReLU "
            "after them, a .detach()/torch.no_grad() between them and the loss, or an output of "
            "theirs that the loss does not use"
        )
    if layers and len(outside) + len(silent) == len(layers):
        return out  # no learning rate moves these layers
    lr = profile.current_lr()
    out.append(
        f"raise the learning rate (now {lr:.3g} for {profile.optimizer}) or check its schedule"
        if lr is not None
        else "raise the learning rate or check its schedule"
    )
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
    AlertKind.ZERO_GRAD: _zero_grad,
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


_FIRST_FIX = "first fix the"


def _speeds_up(item: str) -> bool:
    """Advice that makes updates larger (a larger learning rate, momentum)."""
    return item.startswith(("raise the learning rate", "use SGD momentum"))


def _lowers_lr(item: str) -> bool:
    return item.startswith("lower the learning rate") or "(lower the learning rate" in item


def _lower_lr(profile: ModelProfile) -> str:
    lr = profile.current_lr()
    if lr is None:
        return "lower the learning rate"
    return f"lower the learning rate (now {lr:.3g} for {profile.optimizer})"


def _join(names: Iterable[str]) -> str:
    return "/".join(sorted(names))
