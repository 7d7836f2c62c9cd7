"""gw.audit: one forward/backward before training, the per-layer picture and early warnings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.thresholds import SINGLE_STEP_VANISHING_RATIO as VANISHING_RATIO
from tests import zoo


class Block(nn.Module):
    """A residual block that neither its name nor its source gives away (``a.add(b)``, a helper)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _merge(h, torch.relu(self.fc(h)))


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.add(b)


def batch(d_in: int = 16, n: int = 64) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(1))


def hook_counts(model: nn.Module) -> list[tuple[int, int, int, int]]:
    return [
        (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
        )
        for m in model.modules()
    ]


def test_thirty_layer_tanh_net_is_flagged_vanishing_naming_the_first_layers() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.Tanh, depth=30)
    report = gw.audit(model, batch())
    (alert,) = report.warnings
    assert alert.kind is AlertKind.VANISHING and alert.step == 0
    assert alert.layers[:3] == ("0", "2", "4")  # first layers first
    assert "58" not in alert.layers  # the last layer learns
    assert alert.value == pytest.approx(report.first_last_ratio) and alert.value < VANISHING_RATIO
    assert "your 30-layer Tanh net will starve its first layers" in alert.message
    assert "replace Tanh with ReLU/GELU" in alert.advice
    assert "add residual (skip) connections" in alert.advice
    assert any("30 Linear/Conv layers with Tanh" in finding for finding in report.findings)
    assert [row.name for row in report.layers] == [str(i) for i in range(0, 60, 2)]
    text = str(report)
    assert "will starve its first layers" in text and "- replace Tanh with ReLU/GELU" in text
    assert not report.ok


def test_healthy_relu_he_batchnorm_net_gets_no_warning() -> None:
    torch.manual_seed(0)
    report = gw.audit(zoo.relu_he_bn_mlp(depth=20), batch())
    assert report.warnings == ()
    assert report.findings == ()
    assert report.ok
    assert report.first_last_ratio > 0.05
    assert str(report).endswith("No problems found.")


def test_per_layer_picture_matches_a_manual_backward() -> None:
    torch.manual_seed(0)
    model = zoo.small_cnn()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    report = gw.audit(model, x)
    reference = zoo.small_cnn()
    reference.load_state_dict(model.state_dict())
    loss = reference(x).float().pow(2).mean()
    loss.backward()
    assert report.loss == pytest.approx(loss.item(), rel=1e-5)
    by_name = {row.name: row for row in report.layers}
    for name, module in reference.named_children():
        if name not in by_name:
            continue
        grads = [p.grad.flatten() for p in module.parameters()]
        weights = [p.detach().flatten() for p in module.parameters()]
        row = by_name[name]
        assert row.grad_norm == pytest.approx(torch.cat(grads).norm().item(), rel=1e-4)
        assert row.weight_norm == pytest.approx(torch.cat(weights).norm().item(), rel=1e-5)
        assert row.grad_rms == pytest.approx(row.grad_norm / row.numel**0.5)
    assert report.layers[-1].rms_ratio == pytest.approx(1.0)


def test_audit_leaves_gradients_hooks_buffers_modes_and_rng_untouched() -> None:
    torch.manual_seed(0)
    model = zoo.relu_he_bn_mlp(depth=4)
    x = batch()
    model(x).sum().backward()  # the user's own gradients, mid-accumulation
    grads = {name: p.grad for name, p in model.named_parameters()}
    saved = {name: g.clone() for name, g in grads.items()}
    model[0].register_forward_hook(lambda module, args, output: None)
    model[1].eval()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    hooks = hook_counts(model)
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    gw.audit(model, x)

    for name, param in model.named_parameters():
        assert param.grad is grads[name]
        assert torch.equal(param.grad, saved[name])
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert hook_counts(model) == hooks
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_model_without_gradients_keeps_none() -> None:
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    gw.audit(model, batch())
    assert all(p.grad is None for p in model.parameters())


def test_traced_forward_confirms_residual_connections_the_names_miss() -> None:
    torch.manual_seed(0)
    residual = nn.Sequential(nn.Linear(16, 16), *[Block(16) for _ in range(12)], nn.Linear(16, 1))
    plain = zoo.deep_mlp(nn.ReLU, depth=14)
    assert not gw.audit(plain, batch()).profile.residual
    report = gw.audit(residual, batch())
    assert report.profile.residual
    assert report.profile.residual_evidence == ("traced (12 skip additions)",)


def test_zero_initialised_last_layer_skips_the_single_step_check() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.Tanh, depth=30)
    nn.init.zeros_(model[-1].weight)  # every earlier gradient is exactly zero at step 0
    report = gw.audit(model, batch())
    assert not any(alert.kind is AlertKind.VANISHING for alert in report.alerts)
    assert any("exactly zero gradient" in finding for finding in report.findings)


def test_zero_initialised_residual_branches_are_no_problem() -> None:
    torch.manual_seed(0)
    report = gw.audit(zoo.residual_mlp(depth=12), batch())
    assert report.ok, str(report)


def test_exploding_rnn_is_reported_at_step_zero_with_recurrent_advice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = zoo.exploding_rnn(radius=3.0)
    x = torch.randn(32, 30, 8, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level("INFO", logger="gradwatch"):
        report = gw.audit(model, x, optimizer=optimizer)
    assert any("spectral radius 3 > 1" in finding for finding in report.findings)
    (alert,) = report.warnings
    assert alert.kind is AlertKind.EXPLODING and alert.layers == ("rnn",)
    assert alert.advice[:2] == (
        "lower the learning rate (now 0.01 for SGD)",
        "clip gradients (gw.ClipNorm / gw.ZClip)",
    )
    assert "use LSTM/GRU" in alert.advice
    assert "rescale the recurrent matrix to spectral radius <= 1 (now 3)" in alert.advice
    assert caplog.records == []  # in the report, not in the log


def test_tuple_output_dict_input_and_custom_loss() -> None:
    lstm = nn.LSTM(4, 8, batch_first=True)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(4))
    report = gw.audit(lstm, {"input": x})  # output (out, (h, c)): default loss sums all three
    out, (h, c) = lstm(x)
    expected = out.pow(2).mean() + h.pow(2).mean() + c.pow(2).mean()
    assert report.loss == pytest.approx(expected.item(), rel=1e-5)
    custom = gw.audit(lstm, (x,), loss_fn=lambda output: output[0].sum())
    assert custom.loss == pytest.approx(out.sum().item(), rel=1e-5)


def test_bad_arguments_raise_type_errors() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        gw.audit("model", batch())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gw.audit(nn.Linear(16, 1), batch(), loss_fn=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pass loss_fn"):
        gw.audit(_IntegerOutput(), batch())


class _IntegerOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).argmax(dim=1)
