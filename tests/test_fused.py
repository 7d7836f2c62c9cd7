"""Remedies inside a fused optimizer's kernel: bit for bit the explicit path, composed with
GradScaler, without host reads; the explicit path's one read; hooks shared and restored."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.alerts import AlertKind
from tests.helpers import ONE_TRANSFER, FiresAt, count_syncs

SHAPES = [(16, 9), (9,), (3, 2, 3, 3), (1,), (40,)]  # vector bodies and scalar tails
STEPS = 14
SKIPPED = {0, 4, 5, 11}  # the first step too: fused SGD's momentum must not start from garbage
OVERFLOW = 8  # an inf gradient under a GradScaler: the scaler skips it (and backs off)

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "SGD": lambda ps: torch.optim.SGD(
        ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=True
    ),
}


class Tensors(nn.Module):
    """Parameters of assorted shapes, in two layers."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = nn.ParameterList(
            nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES[:2]
        )
        self.b = nn.ParameterList(
            nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES[2:]
        )


def _gradients(dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Per step: random gradients whose total norm swings over two decades."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        scale = 10 ** (2 * torch.rand((), generator=generator).item() - 1)
        out.append([torch.randn(s, generator=generator).mul(scale).to(dtype) for s in SHAPES])
    return out


def _state(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    return {
        (index, key): value.detach().clone()
        for index, param in enumerate(p for g in optimizer.param_groups for p in g["params"])
        for key, value in optimizer.state.get(param, {}).items()
        if isinstance(value, torch.Tensor)
    }


def _run(
    name: str, dtype: torch.dtype, mode: str, fused: bool | None
) -> tuple[gw.GradWatch, list[dict[str, Any]]]:
    """Trains ``Tensors`` on scripted gradients; returns the watch and a snapshot per step."""
    model = Tensors(dtype)
    params = list(model.parameters())
    optimizer = OPTIMIZERS[name](params)
    scaler = None
    if mode != "none":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    remedies = [
        gw.ZClip(warmup_steps=3),
        gw.ClipNorm(max_norm=2.0),
        gw.SkipStep(on=("nonfinite", "spike")),
    ]
    watch = gw.GradWatch(
        model,
        optimizer,
        detectors=[FiresAt(AlertKind.SPIKE, SKIPPED)],
        remedies=remedies,
        scaler=scaler,
        fused=fused,
        log_every_n_steps=1000,
    )
    snapshots = []
    for step, grads in enumerate(_gradients(dtype)):
        grads = [g.clone() for g in grads]
        if scaler is not None:
            if step == OVERFLOW:
                grads[1][3] = math.inf
            scale = scaler.scale(torch.ones(())).to(dtype)
            grads = [g * scale for g in grads]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        if mode == "unscale":
            scaler.unscale_(optimizer)  # type: ignore[union-attr]
        report = watch.step()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()  # on skipped steps too: the skip is enforced
        snapshots.append(
            {
                "params": [p.detach().clone() for p in params],
                "grads": [None if p.grad is None else p.grad.clone() for p in params],
                "state": _state(optimizer),
                "coef": float(report.clip_coef),  # type: ignore[arg-type]
                "skipped": report.skipped,
            }
        )
        optimizer.zero_grad()
    return watch, snapshots


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.view(integer)


@pytest.mark.parametrize("mode", ["none", "scaler", "unscale"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_path_equals_the_explicit_path_bit_for_bit(name: str, mode: str) -> None:
    fused_watch, fused = _run(name, torch.float32, mode, fused=None)
    explicit_watch, explicit = _run(name, torch.float32, mode, fused=False)
    assert fused_watch.engine.fused and not explicit_watch.engine.fused
    for step, (a, b) in enumerate(zip(fused, explicit, strict=True)):
        assert a["coef"] == b["coef"] and a["skipped"] == b["skipped"], step
        for x, y in zip(a["params"], b["params"], strict=True):
            assert torch.equal(_bits(x), _bits(y)), step
        for key in a["state"].keys() & b["state"].keys():
            assert torch.equal(_bits(a["state"][key]), _bits(b["state"][key])), (step, key)
        if not a["skipped"] and not (mode != "none" and step == OVERFLOW):
            for x, y in zip(a["grads"], b["grads"], strict=True):
                assert x is not None and y is not None and torch.equal(_bits(x), _bits(y)), step
    assert len(explicit[-1]["state"]) >= len(SHAPES)  # every parameter was updated in the end
    assert [s["skipped"] for s in fused] == [step in SKIPPED for step in range(STEPS)]
    assert sum(s["coef"] < 1.0 for s in fused) >= 4  # clipping really happened
    for step in SKIPPED - {0}:  # a skipped update leaves the parameters as they were
        for x, y in zip(fused[step]["params"], fused[step - 1]["params"], strict=True):
            assert torch.equal(x, y), step


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bf16_fused_path_leaves_the_same_gradients_and_nearly_the_same_parameters(
    name: str,
) -> None:
    """bf16 cannot be bit-exact: the kernel feeds the unrounded float32 quotient to the update
    (more accurate than any explicit path, which rounds the clipped gradient to bf16 first)."""
    _, fused = _run(name, torch.bfloat16, "none", fused=None)
    _, explicit = _run(name, torch.bfloat16, "none", fused=False)
    for step, (a, b) in enumerate(zip(fused, explicit, strict=True)):
        assert a["coef"] == b["coef"] and a["skipped"] == b["skipped"], step
        if not a["skipped"]:  # the kernel stores the quotient in .grad: the same bf16 values
            for x, y in zip(a["grads"], b["grads"], strict=True):
                assert x is not None and y is not None and torch.equal(x, y), step
        for x, y in zip(a["params"], b["params"], strict=True):
            torch.testing.assert_close(x.float(), y.float(), rtol=0.02, atol=2e-3)


def test_fused_path_is_chosen_only_where_it_is_exact() -> None:
    def fused(optimizer: Callable[[Any], torch.optim.Optimizer], **kwargs: Any) -> bool:
        model = kwargs.pop("model", None) or nn.Linear(4, 2)
        watch = gw.GradWatch(model, optimizer(model.parameters()), **kwargs)
        watch.close()
        return watch.engine.fused

    assert fused(lambda ps: torch.optim.AdamW(ps, fused=True))
    assert fused(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True))
    assert not fused(lambda ps: torch.optim.AdamW(ps))  # foreach / for-loop: explicit
    assert not fused(lambda ps: torch.optim.AdamW(ps, fused=True), fused=False)
    assert not fused(lambda ps: torch.optim.AdamW(ps, fused=True), model=nn.Linear(4, 2).double())
    assert not fused(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, fused=True)
    )
    assert not fused(lambda ps: torch.optim.Adagrad(ps))
    with pytest.raises(ValueError, match=r"fused=True.*not a fused Adam, AdamW or SGD"):
        fused(lambda ps: torch.optim.AdamW(ps), fused=True)
    with pytest.raises(ValueError, match=r"fused=True.*float64"):
        double = nn.Linear(2, 2).double()
        fused(lambda ps: torch.optim.Adam(ps, fused=True), model=double, fused=True)
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        fused(lambda ps: torch.optim.Adam(ps, fused=True), fused="yes")


# ----------------------------------------------------------------------------- host reads


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def test_clip_skip_and_lr_backoff_inside_a_fused_step_read_nothing_on_the_host() -> None:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    remedies = [gw.ZClip(warmup_steps=2), gw.ClipNorm(1.0), gw.SkipStep(), gw.LRBackoff()]
    watch = gw.GradWatch(model, optimizer, remedies=remedies, scaler=scaler, log_every_n_steps=50)
    x = torch.randn(32, 8)
    for step in range(12):
        loss = model(x * (1 + step % 3)).pow(2).mean() * (math.nan if step == 7 else 1.0)
        scaled = scaler.scale(loss)
        scaled.backward()
        with count_syncs() as counts:
            report = watch.step(loss=loss)  # no scaler.unscale_: the kernel unscales
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        if step:  # the NaN loss of step 7 is a new alert, delivered at once: one transfer
            assert counts == (ONE_TRANSFER if step == 7 else {}), (step, counts)
            assert bool(report.alerts) == (step == 7)
    assert report.skipped is False  # reading the report is the (one) host read
    assert int(optimizer.state[model[0].weight]["step"]) == 11  # step 7 was skipped
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()
    watch.close()


def test_the_explicit_path_reads_the_skip_flag_and_the_lr_scale_in_one_transfer() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)  # not fused, float lr
    watch = gw.GradWatch(
        model, optimizer, remedies=[gw.ClipNorm(1.0), gw.SkipStep(), gw.LRBackoff()]
    )
    assert not watch.engine.fused
    x = torch.randn(32, 8)
    for step in range(4):
        model(x).pow(2).mean().backward()
        with count_syncs() as counts:
            watch.step()
        assert counts == {}, counts  # clipping happened, nothing read yet
        with count_syncs() as counts:
            optimizer.step()
        assert counts == {"cpu": 1, "numpy": 1}, (step, counts)  # one transfer, two values
        optimizer.zero_grad()
    watch.close()


def test_report_skipped_is_read_lazily_and_keeps_its_meaning() -> None:
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    # no detector: SkipStep still sees the NaN, and no alert is delivered (which would read it)
    watch = gw.GradWatch(model, optimizer, detectors=(), remedies=[gw.SkipStep()])
    model(torch.randn(4, 8)).sum().mul(math.nan).backward()
    with count_syncs() as counts:
        report = watch.step()
    assert counts == {} and isinstance(report.skip_flag, torch.Tensor)
    with count_syncs() as counts:
        assert report.skipped is True and report.skipped
    assert counts == {"__bool__": 1}  # once, then cached
    assert "skipped=True" in repr(report)
    watch.close()


# ----------------------------------------------------------------------------- composition


def test_attach_with_a_fused_optimizer_skips_inside_the_kernel() -> None:
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    watch = gw.GradWatch(model, optimizer, remedies=[gw.ZClip(), gw.SkipStep()]).attach()
    x = torch.randn(16, 8)
    params = []
    for step in range(6):
        model(x).pow(2).mean().mul(math.inf if step == 3 else 1.0).backward()
        with count_syncs() as counts:
            optimizer.step()
            optimizer.zero_grad()
        # step 3's Inf is a new alert, delivered at once: one transfer (healthy steps: none)
        assert counts == (ONE_TRANSFER if step == 3 else {}) or step == 0, counts
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(params[3], params[2]) and not torch.equal(params[4], params[3])
    assert int(optimizer.state[model[0].weight]["step"]) == 5
    assert "grad_scale" not in optimizer.__dict__ and "found_inf" not in optimizer.__dict__
    watch.close()


def test_two_watches_on_one_fused_optimizer_compose() -> None:
    """Both skip the same step: found_inf must stay 1.0 (2.0 would not skip and would count Adam's
    step backwards); their divisors multiply."""
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    watches = [
        gw.GradWatch(model, optimizer, remedies=[gw.ClipNorm(0.05), gw.SkipStep()], scaler=scaler)
        for _ in range(2)
    ]
    x = torch.randn(16, 8)
    for step in range(4):
        poison = math.inf if step == 2 else 1.0
        scaler.scale(model(x).pow(2).mean() * poison).backward()
        reports = [watch.step() for watch in watches]
        raw = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if step != 2:  # the kernel divided by the scale and both divisors
            coefs = [float(r.clip_coef) for r in reports]  # type: ignore[arg-type]
            assert coefs[0] == coefs[1] < 1.0
            for grad, before in zip((p.grad for p in model.parameters()), raw, strict=True):
                expected = before / scale * coefs[0] * coefs[1]
                torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0.0)
        optimizer.zero_grad()
    assert int(optimizer.state[model[0].weight]["step"]) == 3
    for watch in watches:
        watch.close()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_a_step_that_raises_between_the_hooks_leaves_nothing_behind() -> None:
    torch.manual_seed(0)
    model, twin = _mlp(), _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    reference = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**6) for _ in range(2)]
    watch = gw.GradWatch(model, optimizer, remedies=[gw.ClipNorm(0.1)], scaler=scalers[0])
    fail = {"now": False}

    def failing_hook(*args: Any) -> None:  # registered after the watch's: runs after it
        if fail["now"]:
            raise RuntimeError("a later pre-hook failed")

    optimizer.register_step_pre_hook(failing_hook)
    x = torch.randn(16, 8)
    for step in range(4):
        for net, opt, scaler in ((model, optimizer, scalers[0]), (twin, reference, scalers[1])):
            scaler.scale(net(x).pow(2).mean()).backward()
            if net is model:
                watch.step()
                fail["now"] = step == 1
                try:
                    scaler.step(opt)
                except RuntimeError:
                    opt.zero_grad()
                    continue
            else:
                if step == 1:  # the reference never makes that update
                    opt.zero_grad()
                    continue
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
                scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert "grad_scale" not in optimizer.__dict__ and "found_inf" not in optimizer.__dict__
    watch.close()


# ----------------------------------------------------------------------------- AMP


def test_fp16_amp_with_overflow_steps_and_no_unscale() -> None:
    """A huge initial scale: the first steps overflow, the scaler skips and backs off; the watch
    records the true (unscaled) norms and raises no NaN alarm; the fused kernel unscales."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    watch = gw.GradWatch(
        model,
        optimizer,
        remedies=[gw.ZClip(warmup_steps=5), gw.SkipStep()],
        scaler=scaler,
        log_every_n_steps=10,
    )
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    overflows = 0
    for _ in range(40):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        scaler.scale(nn.functional.mse_loss(out.float(), y)).backward()
        scale = scaler.get_scale()
        grads = [p.grad.double() / scale for p in model.parameters()]  # type: ignore[union-attr]
        expected = math.sqrt(sum(float(g.square().sum()) for g in grads))
        report = watch.step()
        if math.isfinite(expected):
            assert float(report.total_norm) == pytest.approx(expected, rel=1e-5)  # type: ignore[arg-type]
        scaler.step(optimizer)
        scaler.update()
        overflows += scaler.get_scale() < scale
        optimizer.zero_grad()
    watch.close()
    assert overflows >= 10
    kinds = {alert.kind for alert in watch.alerts}
    assert AlertKind.AMP_OVERFLOW in kinds and AlertKind.NONFINITE not in kinds
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(optimizer.state[model[0].weight]["step"]) == 40 - overflows


# ----------------------------------------------------------------------------- learning rate


def test_lr_backoff_scales_a_tensor_lr_in_place_and_composes_with_a_scheduler() -> None:
    def run(lr: Any) -> tuple[list[float], list[float], int]:
        model = _mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        watch = gw.GradWatch(
            model,
            optimizer,
            detectors=[FiresAt(AlertKind.SPIKE, {2, 9})],
            remedies=[gw.LRBackoff(patience=1, recovery_steps=2)],
        )
        used, stored, reads = [], [], 0
        tensor = optimizer.param_groups[0]["lr"]
        for step in range(16):
            model(torch.ones(4, 8)).sum().backward()
            with count_syncs() as counts:
                report = watch.step()
                optimizer.step(lambda: used.append(float(optimizer.param_groups[0]["lr"])))
            assert bool(report.alerts) == (step == 2)  # delivered at once (9 continues it)
            if report.alerts:  # its early flush: one transfer (+ the advice quoting the lr)
                counts -= Counter({**ONE_TRANSFER, "__float__": 1})
            reads += sum(counts.values())
            scheduler.step()
            stored.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.zero_grad()
        if isinstance(lr, torch.Tensor):
            assert optimizer.param_groups[0]["lr"] is tensor  # the same tensor throughout
        watch.close()
        return used, stored, reads

    used, stored, reads = run(torch.tensor(0.1, dtype=torch.float64))
    float_used, float_stored, float_reads = run(0.1)
    assert used == float_used and stored == float_stored  # exactly the float-lr run
    assert reads == 16  # the test's own reads inside the closure; gradwatch read nothing
    assert float_reads == 16 + 16  # + one read of the scale per step with a float lr
    assert used[2] == 0.05 and used[9] == 0.1 * 0.5**3 * 0.5  # scheduler times backoff


def _host_backoff(
    flags: list[bool], factor: float, min_scale: float, patience: int, recovery: int, cooldown: int
) -> list[float]:
    """LRBackoff's state machine with Python floats (its documented behaviour)."""
    level = depth = 0.0
    healthy, since, out = 0, cooldown, []
    max_level = math.log(min_scale) / math.log(factor)
    for flagged in flags:
        if flagged:
            if since >= cooldown:
                level = min(level + 1.0, max_level)
                depth = max(depth, level)
                since = 0
            healthy = 0
        else:
            healthy += 1
            if healthy > patience and level > 0.0:
                level -= 1.0 / (recovery * depth**2)
                if level < 1e-9:
                    level = depth = 0.0
        since += 1
        out.append(1.0 if level == 0.0 else max(factor**level, min_scale))
    return out


@pytest.mark.parametrize(
    "config", [(0.5, 1e-3, 10, 40, 5), (0.3, 0.05, 0, 3, 1), (0.7, 1e-3, 4, 7, 2)]
)
def test_device_lr_backoff_equals_the_host_state_machine(config: tuple) -> None:
    from tests import factories

    factor, min_scale, patience, recovery, cooldown = config
    generator = torch.Generator().manual_seed(7)
    flags = [False] * 5
    while len(flags) < 600:  # bursts of flags between calm stretches
        burst = int(torch.randint(1, 12, (), generator=generator))
        calm = int(torch.randint(0, 120, (), generator=generator))
        flags += [True] * burst + [False] * calm
    remedy = gw.LRBackoff(
        factor, min_scale=min_scale, patience=patience, recovery_steps=recovery, cooldown=cooldown
    )
    remedy.bind(factories.layout())
    obs = factories.observation([1.0] * 4)
    scales = [
        remedy.decide(factories.remedy_input(obs, flags={AlertKind.SPIKE: f})).lr_scale
        for f in flags
    ]
    expected = _host_backoff(flags, factor, min_scale, patience, recovery, cooldown)
    assert [float(s) for s in scales] == expected  # type: ignore[arg-type]
    assert min(expected) < 1.0 and expected[-1] <= 1.0
