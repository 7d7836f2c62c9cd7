"""Core data path: layers, exact norms, history, flush, hooks, state, bad input."""

from __future__ import annotations

import gc
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from tests.helpers import RecordingSink, count_syncs, reference_norms
from tests.zoo import SequenceRegressor, deep_mlp, residual_mlp, small_cnn


def _train_step(model: nn.Module, x: torch.Tensor, watch: gw.GradWatch) -> gw.StepReport:
    loss = model(x).float().pow(2).mean()
    loss.backward()
    report = watch.step(loss=loss)
    for p in model.parameters():
        p.grad = None
    return report


class Reordered(nn.Module):
    """Registration order differs from execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 1)
        self.body = nn.Linear(8, 8)
        self.stem = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.ones(1))  # owned by the root module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.stem(x))))) * self.scale


def test_layers_follow_forward_order_and_root_is_named_empty() -> None:
    model = Reordered()
    watch = gw.GradWatch(model, detectors=())
    assert watch.layer_names == ["", "head", "body", "stem"]  # registration order first
    model(torch.randn(2, 4)).sum().backward()
    assert watch.layer_names == ["stem", "body", "head", ""]  # root's own params run last
    watch.step()
    assert list(watch.last_norms()) == ["stem", "body", "head", ""]


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda: deep_mlp(nn.Tanh, depth=6), torch.randn(32, 16)),
        (lambda: residual_mlp(depth=3), torch.randn(32, 16)),
        (small_cnn, torch.randn(8, 1, 16, 16)),
        (lambda: SequenceRegressor("LSTM"), torch.randn(4, 7, 8)),
    ],
)
def test_norms_equal_float64_reference(make, x) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = make()
    watch = gw.GradWatch(model, detectors=(), log_every_n_steps=1)
    for _ in range(3):
        model(x).float().pow(2).mean().backward()
        expected = reference_norms(model, watch.layer_names)
        report = watch.step()
        got = watch.last_norms()
        for name in watch.layer_names:
            assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-12)
        total = float(np.sqrt(sum(v**2 for v in expected.values())))
        assert float(report.total_norm) == pytest.approx(total, rel=1e-5)
        model.zero_grad()


def test_tied_frozen_and_unused_parameters() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.unused = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight  # tied

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.out(self.frozen(self.embed(idx)))

    model = Tied()
    watch = gw.GradWatch(model, detectors=(), log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.tensor([[1, 2, 3]])).pow(2).mean().backward()
        watch.step()
    assert (
        "frozen" not in watch.layer_names and "out" not in watch.layer_names
    )  # tied: counted once
    assert watch.layer_names == ["embed", "unused"]
    norms = watch.last_norms()
    assert norms["unused"] == 0.0  # no gradient this step: zero, not NaN
    assert norms["embed"] == pytest.approx(reference_norms(model, ["embed"])["embed"], rel=1e-5)


def test_sparse_and_mixed_dtype_gradients_use_the_fallback() -> None:
    model = nn.ModuleDict({"emb": nn.Embedding(20, 4, sparse=True), "lin": nn.Linear(4, 1)})
    model["lin"].double()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.m["lin"](self.m["emb"](idx).double())

    wrapper = Wrapper()
    watch = gw.GradWatch(wrapper, detectors=(), log_every_n_steps=1)
    idx = torch.tensor([1, 1, 3])  # repeated index: duplicates in the sparse gradient
    wrapper(idx).pow(2).sum().backward()
    watch.step()
    dense = wrapper.m["emb"].weight.grad.to_dense().double().norm()
    assert watch.last_norms()["m.emb"] == pytest.approx(float(dense), rel=1e-5)
    lin = reference_norms(wrapper, ["m.lin"])["m.lin"]
    assert watch.last_norms()["m.lin"] == pytest.approx(lin, rel=1e-5)


def test_torch_compile_keeps_the_original_names() -> None:
    model = Reordered()
    compiled = torch.compile(model, backend="aot_eager")
    watch = gw.GradWatch(compiled, detectors=(), log_every_n_steps=1)
    compiled(torch.randn(2, 4)).sum().backward()
    watch.step()
    assert watch.layer_names == ["stem", "body", "head", ""]
    expected = reference_norms(model, watch.layer_names)
    for name, value in watch.last_norms().items():
        assert value == pytest.approx(expected[name], rel=1e-5)


def test_history_is_a_bounded_window() -> None:
    torch.manual_seed(0)
    model = deep_mlp(nn.ReLU, depth=3)
    watch = gw.GradWatch(model, detectors=(), log_every_n_steps=4, window=10)
    x = torch.randn(8, 16)
    seen = []
    for _ in range(25):
        model(x).pow(2).mean().backward()
        watch.step()
        seen.append(reference_norms(model, watch.layer_names))
        model.zero_grad()
    history = watch.history()
    assert history["step"].tolist() == list(range(15, 25))
    for name in watch.layer_names:
        assert history[name] == pytest.approx([s[name] for s in seen[15:]], rel=1e-5)
    assert watch.engine.history._norms.shape == (10, len(watch.layer_names))  # bounded memory


def test_no_host_sync_between_flushes() -> None:
    torch.manual_seed(0)
    model = deep_mlp(nn.Tanh, depth=5)
    watch = gw.GradWatch(model, log_every_n_steps=5)
    x = torch.randn(8, 16)
    per_step = []
    for _ in range(10):
        loss = model(x).pow(2).mean()
        loss.backward()
        with count_syncs() as counts:
            watch.step(loss=loss)
        per_step.append(dict(counts))
        model.zero_grad()
    for step, counts in enumerate(per_step):
        if (step + 1) % 5:
            assert counts == {}, f"host sync at non-flush step {step}: {counts}"
        else:
            assert counts.get("cpu") == 1, f"flush at step {step} must copy exactly once: {counts}"


def test_attach_runs_step_before_optimizer_step_and_detach_removes_every_hook() -> None:
    torch.manual_seed(0)
    model = Reordered()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    modules = list(model.modules())

    def hook_counts() -> list[int]:
        return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules]

    before = hook_counts()
    watch = gw.GradWatch(model, opt, detectors=(), log_every_n_steps=1, check_activations=False)
    watch.attach()
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert watch.step_count == 3
    watch.close()
    assert hook_counts() == before
    assert not opt._optimizer_step_pre_hooks
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert watch.step_count == 3


def test_step_without_backward_or_twice_warns_at_most() -> None:
    model = Reordered()
    watch = gw.GradWatch(model, detectors=(), log_every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="no gradients"):
        report = watch.step()
    assert report.step == 0 and watch.step_count == 0
    model(torch.randn(2, 4)).sum().backward()
    watch.step()
    with pytest.warns(RuntimeWarning, match="twice"):
        watch.step()
    assert watch.step_count == 1
    model(torch.randn(2, 4)).sum().backward()  # accumulates in place: a new backward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.step()
    assert watch.step_count == 2


def test_state_dict_round_trip_through_weights_only_load() -> None:
    torch.manual_seed(0)
    model = deep_mlp(nn.ReLU, depth=3)
    x = torch.randn(8, 16)
    watch = gw.GradWatch(model, log_every_n_steps=3)
    for _ in range(7):
        model(x).pow(2).mean().backward()
        watch.step()
        model.zero_grad()
    buffer = io.BytesIO()
    torch.save(watch.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = gw.GradWatch(model, log_every_n_steps=3)
    resumed.load_state_dict(state)
    assert resumed.step_count == 7
    for _ in range(2):
        model(x).pow(2).mean().backward()
        report = resumed.step()
        model.zero_grad()
    assert report.step == 8
    history = resumed.history()
    assert history["step"].tolist() == list(range(9))
    before = watch.history()
    for name in watch.layer_names:
        assert history[name][:7] == pytest.approx(before[name])


def test_context_manager_closes() -> None:
    model = Reordered()
    with gw.GradWatch(model, detectors=()) as watch:
        model(torch.randn(2, 4)).sum().backward()
        watch.step()
    assert watch._closed
    assert watch.history()["step"].tolist() == [0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a module"}, TypeError, "model must be a torch.nn.Module"),
        ({"model": nn.Linear(2, 2).requires_grad_(False)}, ValueError, "no trainable parameters"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps must be >= 1, got 0"),
        ({"log_every_n_steps": 2.5}, TypeError, "log_every_n_steps must be an int"),
        (
            {"histogram_every_n_steps": -1},
            ValueError,
            "histogram_every_n_steps must be >= 0, got -1",
        ),
        ({"detectors": "all"}, ValueError, "detectors must be 'default'"),
        ({"detectors": [object()]}, TypeError, r"detectors\[0\] must be a gradwatch detector"),
        ({"remedies": [object()]}, TypeError, r"remedies\[0\] must be a gradwatch remedy"),
        ({"optimizer": "sgd"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite must be one of"),
        ({"on_alert": 3}, TypeError, "on_alert must be callable"),
        ({"logdir": "x", "writer": object()}, ValueError, "either logdir or writer"),
    ],
)
def test_bad_configuration_raises_naming_argument_and_value(kwargs, error, match) -> None:  # type: ignore[no-untyped-def]
    model = kwargs.pop("model", nn.Linear(2, 2))
    optimizer = kwargs.pop("optimizer", None)
    with pytest.raises(error, match=match):
        gw.GradWatch(model, optimizer, **kwargs)


def test_attach_without_optimizer_raises() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        gw.GradWatch(nn.Linear(2, 2)).attach()


def test_internal_failure_degrades_to_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Reordered()
    watch = gw.GradWatch(model, detectors=())
    model(torch.randn(2, 4)).sum().backward()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(watch.engine, "step", broken)
    with pytest.warns(RuntimeWarning, match="boom"):
        report = watch.step()
    assert report.step == 0


def test_distributed_data_parallel_wrapper_is_looked_through(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = Reordered()
        ddp = nn.parallel.DistributedDataParallel(model)
        watch = gw.GradWatch(ddp, detectors=(), log_every_n_steps=1)
        ddp(torch.randn(2, 4)).sum().backward()
        watch.step()
        assert watch.layer_names == ["stem", "body", "head", ""]
        expected = reference_norms(model, watch.layer_names)
        for name, value in watch.last_norms().items():
            assert value == pytest.approx(expected[name], rel=1e-5)
        watch.close()
        del ddp, watch  # DDP's reducer must go before its process group (gloo joins a thread)
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_track_updates_measures_the_exact_update_ratio_on_flush_steps() -> None:
    torch.manual_seed(0)
    model = deep_mlp(nn.ReLU, depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = RecordingSink()
    watch = gw.GradWatch(
        model, opt, detectors=(), log_every_n_steps=4, track_updates=True, sinks=[sink]
    )
    x = torch.randn(8, 16)
    expected = {}
    for step in range(8):
        model(x).pow(2).mean().backward()
        if step == 6:  # the update measured at the flush of step 7
            grads = reference_norms(model, watch.layer_names)
            weights = {
                name: float(
                    torch.cat([p.detach().reshape(-1) for p in m.parameters(recurse=False)]).norm()
                )
                for name, m in model.named_modules()
                if name in watch.layer_names
            }
            expected = {n: 0.1 * grads[n] / weights[n] for n in watch.layer_names}
        watch.step()
        opt.step()
        opt.zero_grad()
    watch.flush()
    ratios = sink.records[-1].update_ratios
    assert ratios is not None
    for column, name in enumerate(watch.layer_names):
        assert float(ratios[column]) == pytest.approx(expected[name], rel=1e-3)
