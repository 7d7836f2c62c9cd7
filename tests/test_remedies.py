"""Remedies: each clipping rule against its published formula, LR backoff with schedulers, skipped
steps, composition, state round trips, host syncs, and the rescue of a diverging run."""

from __future__ import annotations

import copy
import io
import itertools
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.alerts import AlertKind
from tests.helpers import FiresAt, count_syncs
from tests.zoo import regression_data, small_cnn, wide_gelu_mlp

ROOT = Path(__file__).resolve().parents[1]


def _watch(model: nn.Module, remedies: list[gw.Remedy], **kwargs: Any) -> gw.GradWatch:
    kwargs.setdefault("detectors", ())
    kwargs.setdefault("log_every_n_steps", 1000)
    return gw.GradWatch(model, kwargs.pop("optimizer", None), remedies=remedies, **kwargs)


def _set_grads(
    model: nn.Module, total_norm: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """Random gradients with the given total L2 norm (NaN for a non-finite norm); returns copies."""
    grads = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
    scale = total_norm / math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    for param, grad in zip(model.parameters(), grads, strict=True):
        param.grad = grad * scale if math.isfinite(total_norm) else grad * math.nan
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def _total(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


# ----------------------------------------------------------------------------- ClipNorm


class HeadFirst(nn.Module):
    """Registered head first, run last: ``model.parameters()`` order is not the forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU())
        self.stem = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    integer = {4: torch.int32, 8: torch.int64}[a.element_size()]
    return int((a.view(integer).long() - b.view(integer).long()).abs().max())


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e6])
def test_clipnorm_equals_clip_grad_norm(
    max_norm: float, dtype: torch.dtype, norm_type: float
) -> None:
    """The same total and coefficient bit for bit; float64 gradients bit for bit, the others
    within one ulp (divided by ``1 / coef``, as the fused kernels do)."""
    torch.manual_seed(0)
    model = HeadFirst().to(dtype)
    twin = copy.deepcopy(model)
    x = torch.randn(32, 8, dtype=dtype)
    watch = _watch(model, [gw.ClipNorm(max_norm, norm_type=norm_type)])
    for step in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(x * 10**step).pow(2).sum().backward()
        report = watch.step()
        total = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm, norm_type=norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        assert report.clip_coef is not None and report.clip_coef.dtype == dtype
        assert torch.equal(report.clip_coef, coef)
        pairs = zip(model.parameters(), twin.parameters(), strict=True)
        worst = max(_ulps(a.grad, b.grad) for a, b in pairs)  # type: ignore[arg-type]
        assert worst <= (0 if dtype == torch.float64 else 1), (step, worst)
    if max_norm < 1.0:
        assert float(report.clip_coef) < 0.1  # the test clips for real


# ----------------------------------------------------------------------------- AutoClip


def _autoclip_reference(norms: list[float], percentile: float, window: int | None) -> list[float]:
    """Seetharaman et al. (2020): append the norm, clip to np.percentile of the history."""
    history: list[float] = []
    coefs = []
    for norm in norms:
        if not math.isfinite(norm):
            history.append(math.inf)  # a slot of the window, never a value
            coefs.append(1.0)
            continue
        history.append(norm)
        kept = [h for h in (history[-window:] if window else history) if math.isfinite(h)]
        threshold = float(np.percentile(kept, percentile))
        coefs.append(min(1.0, threshold / (norm + 1e-6)))
    return coefs


@pytest.mark.parametrize(("percentile", "window"), [(10.0, None), (25.0, 7), (100.0, 4)])
def test_autoclip_matches_reference(percentile: float, window: int | None) -> None:
    generator = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    norms = list(np.exp(rng.normal(0.0, 1.0, size=40)))
    norms[11] *= 50.0  # a spike
    norms[20] = math.nan  # a non-finite step: neither clipped nor counted
    model = nn.Linear(6, 4)
    watch = _watch(model, [gw.AutoClip(percentile=percentile, window=window)])
    expected = _autoclip_reference(norms, percentile, window)
    clipped = 0
    for norm, coef in zip(norms, expected, strict=True):
        before = _set_grads(model, norm, generator)
        report = watch.step()
        assert float(report.clip_coef) == pytest.approx(coef, rel=1e-5)
        if math.isfinite(norm):
            for grad, original in zip(_grads(model), before, strict=True):
                torch.testing.assert_close(grad, original * coef, rtol=1e-5, atol=1e-7)
        clipped += coef < 0.999
    assert clipped > 5 if percentile < 100 else clipped == 0


def test_autoclip_history_is_bounded_by_window() -> None:
    watch = _watch(nn.Linear(3, 2), [gw.AutoClip(window=5)])
    generator = torch.Generator().manual_seed(0)
    for norm in [100.0] * 5 + [1.0] * 5:
        _set_grads(watch.model, norm, generator)
        watch.step()
    remedy = watch.remedies[0]
    assert remedy.norms.numel() == 5
    assert remedy.state_dict()["norms"] == pytest.approx([1.0] * 5, rel=1e-5)
    _set_grads(watch.model, 3.0, generator)  # the 100s are forgotten: clipped to ~1
    assert float(watch.step().clip_coef) == pytest.approx(1.0 / 3.0, rel=1e-4)


# ----------------------------------------------------------------------------- ZClip


def _zclip_reference(
    norms: list[float], alpha: float, z_thresh: float, warmup: int, eps: float = 1e-6
) -> list[float]:
    """Kumar et al. (2025): reciprocal ("adaptive scaling") rule, EMA fed the clipped norm."""
    buffer: list[float] = []
    mean = var = 0.0
    coefs = []
    for norm in norms:
        if not math.isfinite(norm):
            coefs.append(1.0)
            continue
        if len(buffer) < warmup:
            buffer.append(norm)
            if len(buffer) == warmup:
                mean = sum(buffer) / warmup
                var = sum((b - mean) ** 2 for b in buffer) / warmup
            coefs.append(1.0)
            continue
        std = math.sqrt(var)
        z = (norm - mean) / (std + eps)
        effective = norm
        coef = 1.0
        if z > z_thresh:
            effective = mean + z_thresh * std / (z / z_thresh)
            coef = effective / (norm + 1e-6)
        mean = alpha * mean + (1 - alpha) * effective
        var = alpha * var + (1 - alpha) * (effective - mean) ** 2
        coefs.append(coef)
    return coefs


def test_zclip_matches_reference() -> None:
    generator = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(2)
    norms = list(1.0 + 0.2 * rng.standard_normal(80))
    for step, factor in ((30, 8.0), (31, 5.0), (50, 3.0), (65, 20.0)):
        norms[step] *= factor
    norms[40] = math.inf
    model = nn.Linear(5, 3)
    watch = _watch(model, [gw.ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=10)])
    expected = _zclip_reference(norms, alpha=0.9, z_thresh=2.5, warmup=10)
    for norm, coef in zip(norms, expected, strict=True):
        _set_grads(model, norm, generator)
        assert float(watch.step().clip_coef) == pytest.approx(coef, rel=1e-4)
    assert sum(c < 1.0 for c in expected) >= 4


def test_zclip_leaves_calm_gradients_untouched_and_cuts_a_spike_near_the_mean() -> None:
    generator = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    model = nn.Linear(5, 3)
    remedy = gw.ZClip()
    watch = _watch(model, [remedy])
    for norm in 2.0 + 0.1 * rng.standard_normal(60):
        before = _set_grads(model, float(norm), generator)
        report = watch.step()
        assert float(report.clip_coef) == 1.0
        for grad, original in zip(_grads(model), before, strict=True):
            assert torch.equal(grad, original)  # bit-identical while calm
    mean = float(remedy.mean)
    _set_grads(model, 100.0 * mean, generator)
    watch.step()
    after = _total(_grads(model))
    assert after == pytest.approx(mean, rel=0.05)  # a 100x spike is cut back near the mean


def _zclip_package(norms: list[float], max_grad_norm: float, warmup: int = 25) -> list[float]:
    """The reference ``zclip`` package (1.0.0, defaults alpha 0.97, z_thresh 2.5, eps 1e-6): its
    ``ZClip.step`` transcribed, the coefficient it multiplies the gradients by."""
    alpha, z_thresh, eps = 0.97, 2.5, 1e-6
    buffer: list[float] = []
    mean = var = None
    coefs = []
    for norm in norms:
        if mean is None:
            buffer.append(norm)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((b - mean) ** 2 for b in buffer) / len(buffer)
            coefs.append(min(1.0, max_grad_norm / (norm + 1e-6)))  # clip_grad_norm_
            continue
        assert var is not None
        std = var**0.5
        z = (norm - mean) / (std + eps)
        clip_val = mean + (z_thresh * std) / (z / z_thresh) if z > z_thresh else None
        effective = min(clip_val if clip_val is not None else norm, max_grad_norm)
        coefs.append(effective / (norm + 1e-6) if norm > effective else 1.0)
        update = clip_val if clip_val is not None else norm
        mean = alpha * mean + (1 - alpha) * update
        var = alpha * var + (1 - alpha) * (update - mean) ** 2
    return coefs


@pytest.mark.parametrize("level", [0.3, 3.0], ids=["below-cap", "above-cap"])
def test_zclip_max_grad_norm_reproduces_the_reference_package_defaults(level: float) -> None:
    generator = torch.Generator().manual_seed(4)
    rng = np.random.default_rng(4)
    norms = list(level * (1.0 + 0.1 * rng.standard_normal(120)))
    for step in (40, 41, 70, 95):
        norms[step] *= 8.0
    model = nn.Linear(5, 3)
    watch = _watch(model, [gw.ZClip(max_grad_norm=1.0)])
    expected = _zclip_package(norms, max_grad_norm=1.0)
    for norm, coef in zip(norms, expected, strict=True):
        _set_grads(model, norm, generator)
        assert float(watch.step().clip_coef) == pytest.approx(coef, rel=1e-5, abs=1e-7)
    clipped = sum(c < 1.0 for c in expected)
    assert clipped == 120 if level > 1.0 else 4 <= clipped <= 8  # all above the cap; else spikes


# ----------------------------------------------------------------------------- AGC


def _agc_reference(
    weight: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float
) -> torch.Tensor:
    """Brock et al. (2021), unit by unit (rows of dim 0; a vector is one unit), in float64."""
    weight, grad = weight.double(), grad.double()
    units = [slice(None)] if weight.dim() <= 1 else list(range(weight.shape[0]))
    out = grad.clone()
    for unit in units:
        max_norm = max(float(weight[unit].norm()), eps) * clipping
        grad_norm = float(grad[unit].norm())
        if grad_norm > max_norm:
            out[unit] = grad[unit] * (max_norm / max(grad_norm, 1e-6))
    return out.float()


def _agc_model() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
        nn.ReLU(),
        nn.Linear(10, 2),
    )


def _agc_grads(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(5)
    for param in model.parameters():
        # Per-unit scales spread around the clipping limit: some units clipped, some not.
        shape = (param.shape[0],) + (1,) * (param.dim() - 1) if param.dim() > 1 else ()
        unit_scale = torch.exp(torch.randn(shape, generator=generator) * 1.5) * 0.01
        param.grad = (
            torch.randn(param.shape, generator=generator) * unit_scale * param.detach().abs().mean()
        )


@pytest.mark.parametrize(
    ("exclude", "untouched"),
    [
        (("final",), {"5.weight", "5.bias"}),
        ((), set()),
        (("final", "vectors"), {"5.weight", "0.bias", "3.bias", "5.bias"}),
    ],
)
def test_agc_matches_reference_on_conv_and_linear(
    exclude: tuple[str, ...], untouched: set[str]
) -> None:
    model = _agc_model()
    watch = _watch(model, [gw.AGC(clipping=0.01, eps=1e-3, exclude=exclude)])
    _agc_grads(model)
    before = {name: p.grad.clone() for name, p in model.named_parameters()}  # type: ignore[union-attr]
    report = watch.step()
    changed = set()
    for name, param in model.named_parameters():
        if name in untouched:
            assert torch.equal(param.grad, before[name]), name
            continue
        expected = _agc_reference(param.detach(), before[name], 0.01, 1e-3)
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-9)
        changed |= {name} if not torch.equal(param.grad, before[name]) else set()
    assert {"0.weight", "3.weight"} <= changed  # Conv2d and Linear weights both clipped
    ratio = _total(_grads(model)) / _total(list(before.values()))
    assert float(report.clip_coef) == pytest.approx(ratio, rel=1e-4)


class Block(nn.Module):
    """A pre-norm transformer block with torch's MultiheadAttention (``out_proj`` never runs)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """The root owns ``cls_token`` and ``pos_embed`` (so it finishes its forward last)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Linear(12, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class TinyGPT(nn.Module):
    """A language model whose head is tied to the token embedding (it owns no parameter)."""

    def __init__(self, dim: int = 16, vocab: int = 40, as_dict: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(8, dim)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.as_dict = as_dict

    def forward(self, idx: torch.Tensor) -> Any:
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        logits = self.lm_head(self.ln_f(self.blocks(h)))
        if self.as_dict:  # Hugging Face style: the loss comes first, the logits win
            return {"loss": logits.logsumexp(-1).mean(), "logits": logits}
        return logits


class Tempered(nn.Module):
    """A classifier whose logits are divided by a learnt temperature owned by the root."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.head = nn.Linear(16, 5)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(self.body(x)).float() / self.temperature).view(len(x), -1)


class TwoHeads(nn.Module):
    """A detector-style model with two heads returned as a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.cls, self.box = nn.Linear(16, 5), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.cls(h), self.box(h)


def _output_of(output: Any) -> torch.Tensor:
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, tuple):
        return torch.cat([o.flatten() for o in output])
    return output


@pytest.mark.parametrize(
    ("make", "inputs", "head"),
    [
        (lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)), "x", {"2"}),
        (TinyViT, "patches", {"head"}),
        (TinyGPT, "tokens", {"wte"}),
        (lambda: TinyGPT(as_dict=True), "tokens", {"wte"}),
        (Tempered, "x", {"head"}),
        (TwoHeads, "x", {"cls", "box"}),
    ],
    ids=["mlp", "vit", "tied-lm", "tied-lm-dict", "temperature", "two-heads"],
)
def test_agc_leaves_exactly_the_output_layer_unclipped(
    make: Callable[[], nn.Module], inputs: str, head: set[str]
) -> None:
    torch.manual_seed(0)
    model = make()
    batch = {
        "x": torch.randn(6, 12),
        "patches": torch.randn(6, 4, 12),
        "tokens": torch.randint(0, 40, (6, 8)),
    }[inputs]
    watch = _watch(model, [gw.AGC(clipping=0.01)])
    (_output_of(model(batch)).pow(2).mean() * 1e6).backward()  # every unit far past the limit
    before = {name: p.grad.clone() for name, p in model.named_parameters()}  # type: ignore[union-attr]
    watch.step()
    untouched = {
        name.rpartition(".")[0]
        for name, p in model.named_parameters()
        if torch.equal(p.grad, before[name]) and before[name].abs().sum() > 0  # type: ignore[arg-type]
    }
    assert untouched == head
    watch.close()


# ----------------------------------------------------------------------------- LRBackoff


def _backoff_run(
    remedy: gw.LRBackoff,
    fire: Any,
    steps: int,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    attach: bool = False,
) -> dict[str, list[float]]:
    """Trains a tiny model; records the lr used inside each optimizer step, the stored lr, the
    report's scale and what the scheduler alone gives."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    alone = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedulers = [make_scheduler(optimizer), make_scheduler(alone)] if make_scheduler else []
    watch = _watch(model, [remedy], optimizer=optimizer, detectors=[FiresAt(AlertKind.SPIKE, fire)])
    if attach:
        watch.attach()
    out: dict[str, list[float]] = {
        k: [] for k in ("used", "stored", "alone", "alone_after", "scale")
    }
    x = torch.randn(8, 2)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        if not attach:
            out["scale"].append(watch.step().lr_scale)
        out["alone"].append(alone.param_groups[0]["lr"])
        optimizer.step(lambda: out["used"].append(optimizer.param_groups[0]["lr"]))
        optimizer.zero_grad()
        alone.step()
        for scheduler in schedulers:
            scheduler.step()
        out["stored"].append(optimizer.param_groups[0]["lr"])
        out["alone_after"].append(alone.param_groups[0]["lr"])
    watch.close()
    return out


def test_lr_backoff_single_spike_acts_on_its_step_and_fully_recovers_within_100_steps() -> None:
    run = _backoff_run(gw.LRBackoff(), fire={20}, steps=160)
    scale = run["scale"]
    assert scale[:20] == [1.0] * 20
    assert scale[20] == 0.5
    assert run["used"][20] == pytest.approx(0.05)  # the update of the detecting step is scaled
    recovered = next(i for i in range(21, len(scale)) if scale[i] == 1.0)
    assert recovered - 20 <= 100
    assert all(b >= a for a, b in itertools.pairwise(scale[20:]))  # climbs, never dips
    assert run["used"][recovered:] == [0.1] * (len(scale) - recovered)
    assert run["stored"] == [0.1] * 160  # the stored lr is never touched


def test_lr_backoff_stays_quiet_without_detections() -> None:
    run = _backoff_run(gw.LRBackoff(), fire=(), steps=30)
    assert run["scale"] == [1.0] * 30
    assert run["used"] == [0.1] * 30


def test_lr_backoff_compounds_with_cooldown_and_floor() -> None:
    run = _backoff_run(gw.LRBackoff(cooldown=5), fire=range(10, 30), steps=31)
    assert run["scale"][29] == 0.5**4  # flagged 20 steps: one backoff per 5 steps
    floored = _backoff_run(gw.LRBackoff(cooldown=1, min_scale=0.01), fire=range(40), steps=40)
    assert floored["scale"][-1] == pytest.approx(0.01)
    assert min(floored["scale"]) == pytest.approx(0.01)
    assert floored["used"][-1] == pytest.approx(0.001)


def test_lr_backoff_deeper_backoff_climbs_back_slower() -> None:
    def recovery_steps(fire: list[int]) -> int:
        scale = _backoff_run(gw.LRBackoff(), fire=fire, steps=fire[-1] + 700)["scale"]
        return next(i for i in range(fire[-1], len(scale)) if scale[i] == 1.0) - fire[-1]

    shallow, deep = recovery_steps([5]), recovery_steps([5, 10])
    assert shallow == 50  # patience 10 + recovery_steps 40
    assert deep == 10 + 2 * 160  # two levels, 40 * depth**2 steps each


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.8),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=200),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50),  # chainable form
        lambda opt: torch.optim.lr_scheduler.ChainedScheduler(
            [
                torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99),
                torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5),
            ]
        ),
    ],
    ids=["StepLR", "OneCycleLR", "CosineAnnealingLR", "ChainedScheduler"],
)
def test_lr_backoff_composes_with_schedulers(make_scheduler: Callable[[Any], Any]) -> None:
    run = _backoff_run(gw.LRBackoff(), fire={10, 80}, steps=200, make_scheduler=make_scheduler)
    for step, (used, alone, scale) in enumerate(
        zip(run["used"], run["alone"], run["scale"], strict=True)
    ):
        assert used == pytest.approx(alone * scale, rel=1e-12), step
    assert run["stored"] == run["alone_after"]  # exactly the scheduler's value, at every step
    assert run["scale"][10] == 0.5 and run["scale"][80] == 0.5
    assert run["scale"][-1] == 1.0 and run["used"][-1] == run["alone"][-1]


def test_lr_backoff_with_attach_scales_from_the_first_step_and_detach_removes_its_hooks() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks_before = (
        len(optimizer._optimizer_step_pre_hooks),
        len(optimizer._optimizer_step_post_hooks),
    )
    watch = _watch(
        model,
        [gw.LRBackoff()],
        optimizer=optimizer,
        detectors=[FiresAt(AlertKind.EXPLODING, {0, 6})],
    ).attach()
    used = []
    for _ in range(8):
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step(lambda: used.append(optimizer.param_groups[0]["lr"]))
        optimizer.zero_grad()
    assert used[0] == pytest.approx(0.05)  # bound inside the optimizer's pre-hook loop: still works
    assert used[6] == pytest.approx(0.025)
    watch.close()
    assert optimizer.param_groups[0]["lr"] == 0.1
    hooks_after = (
        len(optimizer._optimizer_step_pre_hooks),
        len(optimizer._optimizer_step_post_hooks),
    )
    assert hooks_after == hooks_before


# ----------------------------------------------------------------------------- SkipStep


def _adam_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [v.clone() if torch.is_tensor(v) else torch.tensor(v) for v in state.values()]
    return tensors


@pytest.mark.parametrize("attach", [False, True])
def test_skipstep_leaves_adam_state_bit_identical(attach: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    remedy = gw.SkipStep()
    watch = _watch(model, [remedy], optimizer=optimizer)
    if attach:
        watch.attach()
    x = torch.randn(16, 4)
    skipped = []
    for step in range(8):
        loss = model(x).pow(2).mean() * (math.nan if step == 5 else 1.0)
        loss.backward()
        before = _adam_snapshot(model, optimizer)
        if not attach:
            skipped.append(watch.step(loss=loss).skipped)
        optimizer.step()  # called even on the skipped step: the skip is enforced
        optimizer.zero_grad()
        after = _adam_snapshot(model, optimizer)
        if step == 5:
            assert len(before) == len(after)
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        else:
            assert not torch.equal(before[0], after[0])  # healthy steps do update
    assert optimizer.state[next(model.parameters())]["step"] == 7  # one of 8 updates skipped
    assert remedy.skipped == 1
    if not attach:
        assert skipped == [False] * 5 + [True] + [False] * 2


def test_skipstep_on_spike_skips_only_flagged_steps() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = _watch(
        model,
        [gw.SkipStep(on=("spike",))],
        optimizer=optimizer,
        detectors=[FiresAt(AlertKind.SPIKE, {2, 4})],
    )
    skipped = []
    for _ in range(6):
        model(torch.ones(2, 3)).sum().backward()
        skipped.append(watch.step().skipped)
        optimizer.zero_grad()
    assert skipped == [False, False, True, False, True, False]


def _bn_run(
    fused: bool, skip: str, bad_step: int = 2, steps: int = 5, **kwargs: Any
) -> tuple[nn.Module, gw.GradWatch | None]:
    """``zoo.small_cnn`` on fixed batches; the batch of ``bad_step`` holds a NaN. ``skip``:
    "remedy" (SkipStep), "never-seen" (the reference: that batch is never used) or "none"."""
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 1, 16, 16, generator=generator) for _ in range(steps)]
    batches[bad_step][3, 0, 5, 5] = math.nan
    targets = torch.arange(8) % 10
    watch = None
    if skip != "never-seen":
        remedies = [gw.SkipStep()] if skip == "remedy" else []
        watch = gw.GradWatch(model, optimizer, remedies=remedies, **kwargs)
    for step, x in enumerate(batches):
        if skip == "never-seen" and step == bad_step:
            continue
        nn.functional.cross_entropy(model(x), targets).backward()
        if watch is not None:
            watch.step()
        optimizer.step()  # the watch skips the poisoned update itself
        optimizer.zero_grad()
    return model, watch


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_skipstep_restores_batchnorm_running_stats_poisoned_in_the_forward(fused: bool) -> None:
    """A NaN in the input batch poisons BatchNorm's running mean/var before any gradient exists;
    the skipped step puts them back: bit for bit a run that never saw the batch."""
    model, watch = _bn_run(fused, "remedy")
    reference, _ = _bn_run(fused, "never-seen")
    assert watch is not None and watch.engine.fused is fused
    # parameters, running statistics and num_batches_tracked
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    model.eval()
    assert torch.isfinite(model(torch.randn(4, 1, 16, 16))).all()
    watch.close()
    assert not any(a.kind is AlertKind.NONFINITE_BUFFERS for a in watch.alerts)


def test_poisoned_running_stats_are_reported_naming_the_layers() -> None:
    model, watch = _bn_run(True, "none", log_every_n_steps=2)
    assert watch is not None
    watch.close()
    alerts = [a for a in watch.alerts if a.kind is AlertKind.NONFINITE_BUFFERS]
    assert len(alerts) == 1  # once per episode, not at every flush
    assert alerts[0].layers == ("1", "4") and alerts[0].severity == "error"
    assert "evaluation" in alerts[0].message and any("SkipStep" in a for a in alerts[0].advice)
    assert not torch.isfinite(model[1].running_mean).all()


# ----------------------------------------------------------------------------- composition, state


def test_remedies_compose_in_order() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8) * 10
    model(x).pow(2).sum().backward()
    original = _total(_grads(model))
    assert original > 10
    report = _watch(model, [gw.ClipNorm(5.0), gw.ClipNorm(1.0)]).step()
    assert _total(_grads(model)) == pytest.approx(1.0, rel=1e-4)
    assert float(report.clip_coef) == pytest.approx(1.0 / original, rel=1e-4)

    model.zero_grad()
    model(x).pow(2).sum().backward()
    _watch(model, [gw.AGC(exclude=()), gw.ClipNorm(1e-3)]).step()
    # ClipNorm saw AGC's result (re-measured), not the stale pre-AGC norm.
    assert _total(_grads(model)) == pytest.approx(1e-3, rel=1e-4)


def _remedy_sets() -> list[Callable[[], list[gw.Remedy]]]:
    return [
        lambda: [gw.ClipNorm(1.0)],
        lambda: [gw.AutoClip(window=6)],
        lambda: [gw.AutoClip()],
        lambda: [gw.ZClip(warmup_steps=4)],
        lambda: [gw.AGC()],
        lambda: [gw.LRBackoff(patience=1, recovery_steps=3)],
        lambda: [gw.SkipStep(on=("nonfinite", "spike"))],
    ]


@pytest.mark.parametrize("make", _remedy_sets())
def test_state_dict_round_trip_continues_exactly(make: Callable[[], list[gw.Remedy]]) -> None:
    rng = np.random.default_rng(6)
    norms = list(np.exp(rng.normal(0, 1, 30)))
    norms[9] = math.nan
    norms[16] *= 30
    fire = {3, 8, 17}

    def fresh(model: nn.Module) -> gw.GradWatch:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return _watch(
            model, make(), optimizer=optimizer, detectors=[FiresAt(AlertKind.SPIKE, fire)]
        )

    def run(watch: gw.GradWatch, steps: range, seed: int) -> list[tuple[float, float, bool]]:
        generator = torch.Generator().manual_seed(seed)
        out = []
        for step in steps:
            _set_grads(watch.model, float(norms[step]), generator)
            report = watch.step()
            coef = float(report.clip_coef) if report.clip_coef is not None else 1.0
            out.append((coef, report.lr_scale, report.skipped))
            assert watch.optimizer is not None
            if not report.skipped:
                watch.optimizer.step()
        return out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    resumed_model = copy.deepcopy(model)
    original = fresh(model)
    run(original, range(0, 12), seed=1)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_model.load_state_dict(model.state_dict())
    resumed = fresh(resumed_model)
    resumed.load_state_dict(state)
    assert run(resumed, range(12, 30), seed=2) == run(original, range(12, 30), seed=2)
    for a, b in zip(original.remedies, resumed.remedies, strict=True):
        assert a.state_dict() == b.state_dict()


def test_clipping_remedies_add_no_host_sync() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    remedies = [gw.ClipNorm(1.0), gw.AutoClip(window=20), gw.ZClip(warmup_steps=3), gw.AGC()]
    watch = _watch(model, remedies, log_every_n_steps=10)
    x = torch.randn(16, 8)
    for step in range(9):
        model(x * (1 + step % 3)).pow(2).mean().backward()
        with count_syncs() as counts:
            report = watch.step()
        model.zero_grad()
        if step:
            assert counts == {}, f"host sync at step {step}: {counts}"
    assert float(report.clip_coef) < 1.0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: gw.ClipNorm(0.0), r"max_norm .*got 0\.0"),
        (lambda: gw.ClipNorm(-1), r"max_norm .*got -1"),
        (lambda: gw.ClipNorm(1.0, norm_type=1.0), r"norm_type .*got 1\.0"),
        (lambda: gw.AutoClip(percentile=0.0), r"percentile .*\(0, 100\].*got 0\.0"),
        (lambda: gw.AutoClip(percentile=100.5), r"percentile .*got 100\.5"),
        (lambda: gw.AutoClip(window=0), r"window .*got 0"),
        (lambda: gw.ZClip(alpha=1.0), r"alpha .*\(0, 1\).*got 1\.0"),
        (lambda: gw.ZClip(alpha=0), r"alpha .*got 0"),
        (lambda: gw.ZClip(z_thresh=-2.0), r"z_thresh .*got -2\.0"),
        (lambda: gw.AGC(clipping=0.0), r"clipping .*got 0\.0"),
        (lambda: gw.AGC(exclude=("head",)), r"exclude .*'head'"),
        (lambda: gw.LRBackoff(factor=1.0), r"factor .*\(0, 1\).*got 1\.0"),
        (lambda: gw.LRBackoff(factor=0.0), r"factor .*got 0\.0"),
        (lambda: gw.LRBackoff(min_scale=0.0), r"min_scale .*got 0\.0"),
        (lambda: gw.LRBackoff(on=("loss",)), r"on .*'loss'"),
        (lambda: gw.SkipStep(on=("nonfinite", "nan")), r"on .*'nan'"),
        (lambda: gw.SkipStep(on=()), r"on must name at least one"),
    ],
)
def test_bad_input_raises_naming_argument_and_value(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("remedy", [gw.LRBackoff(), gw.SkipStep()], ids=["LRBackoff", "SkipStep"])
def test_optimizer_remedies_need_an_optimizer(remedy: gw.Remedy) -> None:
    with pytest.raises(ValueError, match=type(remedy).__name__):
        gw.GradWatch(nn.Linear(2, 1), remedies=[remedy])


# ----------------------------------------------------------------------------- the rescue


RESCUE_SEEDS = range(6)


def _train(
    remedies: list[gw.Remedy] | None, steps: int, seed: int = 0
) -> tuple[list[float], list[gw.StepReport]]:
    x, y = regression_data()
    model = wide_gelu_mlp(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    watch = (
        gw.GradWatch(model, optimizer, remedies=remedies, log_every_n_steps=50)
        if remedies
        else None
    )
    losses, reports = [], []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if watch is None:
            optimizer.step()
            continue
        report = watch.step(loss=loss)
        reports.append(report)
        if not report.skipped:
            optimizer.step()
    if watch is not None:
        watch.close()
    return losses, reports


def test_remedies_rescue_a_diverging_learning_rate() -> None:
    """Over several initialisations: the unrescued run is lost, every rescued one stays finite.

    A run this far past its stable learning rate is chaotic: its final loss depends on the CPU and
    the thread count. What holds everywhere is asserted: every loss finite for every seed, each run
    ends below its starting loss, the median over seeds ends far below it, and the remedies acted.
    """
    final_ratios, backed_off = [], 0
    for seed in RESCUE_SEEDS:
        unrescued, _ = _train(None, steps=10, seed=seed)
        assert not all(math.isfinite(loss) for loss in unrescued), seed  # lost within 10 steps

        losses, reports = _train(
            [gw.AutoClip(), gw.LRBackoff(), gw.SkipStep(on=("nonfinite", "spike"))],
            steps=300,
            seed=seed,
        )
        assert all(math.isfinite(loss) for loss in losses), seed
        final_ratios.append(float(np.mean(losses[-10:])) / losses[0])
        assert final_ratios[-1] < 0.5, (seed, final_ratios)
        assert sum(float(r.clip_coef) < 0.999 for r in reports) > 10, seed  # AutoClip acted
        backed_off += min(r.lr_scale for r in reports) < 1.0
    assert float(np.median(final_ratios)) < 0.05, final_ratios
    assert backed_off >= len(RESCUE_SEEDS) // 2, backed_off  # LRBackoff acted in most runs


def test_rescue_example_runs_and_logs_clip_coef_and_lr_scale(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plot = tmp_path / "rescue.png"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "rescue_diverging_lr.py"),
            "--steps",
            "60",
            "--logdir",
            str(tmp_path / "runs"),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    assert "unrescued" in result.stdout and "the run is lost" in result.stdout
    assert "60 steps, every loss finite" in result.stdout
    assert plot.stat().st_size > 10_000
    events = EventAccumulator(str(tmp_path / "runs" / "rescued"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "gradwatch/clip_coef" in tags and "gradwatch/lr_scale" in tags
    lr_scale = [e.value for e in events.Scalars("gradwatch/lr_scale")]
    assert len(lr_scale) == 60 and min(lr_scale) < 1.0
    assert min(e.value for e in events.Scalars("gradwatch/clip_coef")) < 1.0
