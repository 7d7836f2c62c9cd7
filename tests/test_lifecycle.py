"""Lifecycle: a watched model is copied, averaged, pickled, saved, compiled, changed and resumed; a
watch is dropped without ``close()``. Training goes on, copies stay independent, nothing leaks."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import threading
import warnings
import weakref
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.sinks.tensorboard import TensorBoardSink
from tests.helpers import RecordingSink, reference_norms


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))


def train(
    model: nn.Module,
    watch: gw.GradWatch,
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    attached: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """``steps`` steps of a regression; ``attached``: the optimizer's hook runs the watch."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator).to(dtype)
        loss = model(x).pow(2).mean()
        loss.backward()
        skipped = False if attached else watch.step(loss=loss).skipped
        if optimizer is not None and not skipped:
            optimizer.step()
        model.zero_grad()


def gradwatch_hooks(model: nn.Module) -> int:
    """Forward hooks of any kind left on the model's modules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def optimizer_hooks(optimizer: torch.optim.Optimizer) -> int:
    return len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


# ----------------------------------------------------------------------------- copies


@pytest.mark.parametrize("when", ["before the first step", "after training"])
def test_a_deep_copy_trains_and_never_feeds_the_original(when: str) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(
        model, optimizer, check_activations=True, remedies=[gw.LRBackoff()], log_every_n_steps=5
    ).attach()
    if when == "after training":
        train(model, watch, 7, optimizer, attached=True)
    twin = copy.deepcopy(model)
    twin_optimizer = copy.deepcopy(optimizer)
    # The copy's forwards (NaN activations, reversed call order) reach no statistic of the watch.
    twin(torch.full((2, 4), float("nan"))).sum().backward()
    twin_optimizer.step()
    train(model, watch, 8, optimizer, attached=True)
    watch.close()
    assert watch.layer_names == ["0", "2", "4"]
    assert watch.step_count == (15 if when == "after training" else 8)
    assert not [a for a in watch.alerts if a.kind is gw.AlertKind.NONFINITE]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_ema_averaged_model_updates_and_runs() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, optimizer, check_activations=True, remedies=[gw.LRBackoff()])
    watch.attach()
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        model(torch.randn(16, 4, generator=generator)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
    assert torch.isfinite(ema(torch.randn(3, 4))).all()
    assert watch.step_count == 6
    watch.close()


def test_whole_model_and_optimizer_pickle_save_and_load() -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sink = TensorBoardSink(writer=_NullWriter())  # a writer thread and its lock stay out of it
    watch = gw.GradWatch(
        model, optimizer, check_activations=True, remedies=[gw.LRBackoff()], sinks=[sink]
    ).attach()
    train(model, watch, 3, optimizer, attached=True)
    for obj in (model, optimizer):
        assert type(pickle.loads(pickle.dumps(obj))) is type(obj)
        assert type(torch.load(_saved(obj), weights_only=False)) is type(obj)
    loaded_model = torch.load(_saved(model), weights_only=False)
    loaded_model(torch.randn(2, 4)).sum().backward()  # its inert hooks do nothing
    train(model, watch, 2, optimizer, attached=True)
    assert watch.step_count == 5
    watch.close()


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("check_activations", [False, True])
def test_compile_fullgraph_traces_the_hooks_and_measures_like_eager(
    check_activations: bool,
) -> None:
    """Hooks run inside the compiled graph; dynamo does not see hooks added after it traced."""

    def run(compiled: bool) -> tuple[gw.GradWatch, list[dict[str, float]], list[float]]:
        model = mlp()
        nn.init.constant_(model[2].bias, 8.0)  # the Sigmoid saturates
        watch = gw.GradWatch(model, check_activations=check_activations, log_every_n_steps=1)
        torch._dynamo.reset()  # dynamo would reuse a graph traced for another model's hooks
        forward = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        norms, saturated = [], []
        generator = torch.Generator().manual_seed(0)
        for _ in range(4):
            forward(torch.randn(16, 4, generator=generator)).pow(2).mean().backward()
            if watch.engine.activations is not None:
                stats = watch.engine.activations.collect()
                assert stats is not None
                saturated.append(float(stats.saturated[1]))
            else:
                expected = reference_norms(model, ["0", "2", "4"])
                watch.step()
                norms.append(watch.last_norms())
                assert norms[-1] == pytest.approx(expected, rel=1e-5)
            model.zero_grad()
        return watch, norms, saturated

    eager, eager_norms, eager_saturated = run(compiled=False)
    compiled, compiled_norms, compiled_saturated = run(compiled=True)
    assert compiled.layer_names == eager.layer_names == ["0", "2", "4"]
    assert len(compiled_norms) == len(eager_norms)
    for compiled_step, eager_step in zip(compiled_norms, eager_norms, strict=True):
        assert compiled_step == pytest.approx(eager_step, rel=1e-5)
    assert compiled_saturated == pytest.approx(eager_saturated, rel=1e-6)
    if check_activations:
        assert min(compiled_saturated) > 0.5


# ----------------------------------------------------------------------------- garbage collection


def test_a_watch_dropped_without_close_flushes_and_releases_everything(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = RecordingSink()
    watch = gw.GradWatch(
        model,
        optimizer,
        logdir=tmp_path,
        sinks=[sink],
        check_activations=True,
        remedies=[gw.LRBackoff(factor=0.5)],
        log_every_n_steps=10,
    ).attach()
    train(model, watch, 13, optimizer, attached=True)
    watch.engine._source.arm(lr_scale=0.5)  # type: ignore[union-attr]  # backed off when dropped
    threads = [t for t in threading.enumerate() if t.name == "gradwatch-tensorboard"]
    assert len(threads) == 1
    dropped = weakref.ref(watch)
    del watch
    gc.collect()
    assert dropped() is None
    assert gradwatch_hooks(model) == 0 and optimizer_hooks(optimizer) == 0
    assert optimizer.param_groups[0]["lr"] == 0.05
    threads[0].join(timeout=30)
    assert not threads[0].is_alive()
    assert sink.closed
    assert [int(s) for record in sink.records for s in record.steps] == list(range(13))


def test_a_callback_referring_to_the_watch_does_not_keep_it_alive() -> None:
    def build() -> weakref.ref[gw.GradWatch]:
        model = mlp()
        watch: gw.GradWatch | None = None

        def on_alert(alert: gw.Alert) -> None:
            assert watch is not None

        watch = gw.GradWatch(model, on_alert=on_alert)
        return weakref.ref(watch)

    dropped = build()
    gc.collect()
    assert dropped() is None


def test_a_notebook_cell_run_twice_composes_the_learning_rate_scales_exactly() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    backoff = {"factor": 0.1, "on": ("exploding",)}
    first = gw.GradWatch(model, optimizer, remedies=[gw.LRBackoff(**backoff)]).attach()
    second = gw.GradWatch(model, optimizer, remedies=[gw.LRBackoff(**backoff)]).attach()
    used: list[float] = []  # the learning rate of each update (this hook runs last)
    optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        scale = 1e6 if step == 3 else 1.0  # an exploding step: both watches back off
        (model(torch.randn(16, 4, generator=generator)).pow(2).mean() * scale).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert optimizer.param_groups[0]["lr"] == 0.05  # never stored scaled
    assert used[:3] == [0.05] * 3
    assert used[3] == pytest.approx(0.05 * 0.1 * 0.1)  # the two scales multiply
    del first  # dropped without close(): its scale goes, the other's stays
    gc.collect()
    model(torch.randn(16, 4)).pow(2).mean().backward()
    optimizer.step()
    assert used[-1] == pytest.approx(0.05 * 0.1)
    second.close()
    optimizer.step()
    assert used[-1] == 0.05 and optimizer.param_groups[0]["lr"] == 0.05
    assert optimizer_hooks(optimizer) == 1  # the test's own


# ----------------------------------------------------------------------------- model changes


def _changed_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "model changed" in str(w.message)]


@pytest.mark.parametrize(
    "change",
    [
        "replace a layer",
        "add a module",
        "unfreeze a layer",
        "to_empty on a meta model",
        "assign",
        "float64",
    ],
)
def test_a_changed_model_is_noticed_and_read_again(change: str) -> None:
    if change == "to_empty on a meta model":
        with torch.device("meta"):
            model = mlp()
    else:
        model = mlp()
    if change == "unfreeze a layer":
        model[0].requires_grad_(False)
    sink = RecordingSink()
    watch = gw.GradWatch(model, log_every_n_steps=5, sinks=[sink])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if change != "to_empty on a meta model":
            train(model, watch, 7)
        if change == "replace a layer":
            model[2] = nn.Linear(8, 8)
        elif change == "add a module":
            model.add_module("5", nn.Linear(1, 1))
        elif change == "unfreeze a layer":
            model[0].requires_grad_(True)
        elif change == "float64":
            model.double()
        elif change == "assign":
            fresh = {k: v.clone() for k, v in mlp().state_dict().items()}
            model.load_state_dict(fresh, assign=True)
        else:
            model.to_empty(device="cpu")
            torch.manual_seed(1)
            for module in model:
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        dtype = torch.float64 if change == "float64" else torch.float32
        train(model, watch, 9, seed=1, dtype=dtype)
        expected_names = {"0", "2", "4"} | ({"5"} if change == "add a module" else set())
        model(torch.randn(16, 4, dtype=dtype)).pow(2).mean().backward()
        expected = reference_norms(model, sorted(expected_names))
        watch.step()
        norms = watch.last_norms()
    messages = _changed_warnings(caught)
    assert len(messages) == 1
    if change in ("replace a layer", "assign"):
        assert "changed: '2'" in messages[0] or "changed: '0', '2', '4'" in messages[0]
    assert set(watch.layer_names) == expected_names
    assert norms == pytest.approx(expected, rel=1e-5)
    steps = watch.history()["step"]
    assert steps.tolist() == list(range(watch.step_count))  # the numbering carries on
    assert [int(s) for r in sink.records for s in r.steps] == steps.tolist()
    watch.close()


def test_a_selection_holds_across_a_change_and_an_unchanged_model_is_never_read_again() -> None:
    model = mlp()
    watch = gw.GradWatch(model, exclude=["2"], log_every_n_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, watch, 7)
        assert _changed_warnings(caught) == []
        model[4] = nn.Linear(8, 1)
        train(model, watch, 7, seed=1)
    assert len(_changed_warnings(caught)) == 1
    assert watch.layer_names == ["0", "4"]
    watch.close()


def test_history_carries_over_by_layer_name_across_a_replaced_layer() -> None:
    model = mlp()
    watch = gw.GradWatch(model, log_every_n_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, watch, 8)
        before = watch.history()
        model[4] = nn.Linear(8, 1)
        train(model, watch, 8, seed=1)
    after = watch.history()
    assert after["step"].tolist() == list(range(16))
    for name in ("0", "2", "4"):
        np.testing.assert_array_equal(after[name][:8], before[name])
        assert (after[name][8:] > 0).all()  # the replaced layer reads its new gradients, not 0


# ----------------------------------------------------------------------------- resume


def _dead_unit_alerts(cut: int | None) -> list[tuple[str, int]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias[:6] = -100.0  # six of eight units never fire
    watch = gw.GradWatch(model, check_activations=True, log_every_n_steps=5)
    generator = torch.Generator().manual_seed(0)
    for step in range(80):
        if step == cut:
            state = torch.load(_saved(watch.state_dict()), weights_only=True)
            watch.close()
            watch = gw.GradWatch(model, check_activations=True, log_every_n_steps=5)
            watch.load_state_dict(state)
        model(torch.randn(16, 4, generator=generator)).pow(2).mean().backward()
        watch.step()
        model.zero_grad()
    watch.close()
    return [(a.kind.value, a.step) for a in watch.alerts]


@pytest.mark.parametrize("cut", [25, 27])
def test_resume_with_activation_checks_is_exact(cut: int) -> None:
    uninterrupted = _dead_unit_alerts(None)
    assert uninterrupted == [("dead_units", 49)]
    assert _dead_unit_alerts(cut) == uninterrupted


def test_state_of_another_model_is_refused_with_a_warning() -> None:
    model = mlp()
    watch = gw.GradWatch(model, log_every_n_steps=5, detectors=[gw.NonFiniteDetector()])
    train(model, watch, 12)
    model(torch.full((2, 4), float("nan"))).sum().backward()
    watch.step()
    model.zero_grad()
    state = watch.state_dict()
    assert state["step"] == 13 and watch.alerts
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1))
    fresh = gw.GradWatch(other, log_every_n_steps=5, detectors=[gw.NonFiniteDetector()])
    with pytest.warns(RuntimeWarning, match="other layers"):
        fresh.load_state_dict(state)
    assert fresh.step_count == 0 and fresh.alerts == []
    assert len(fresh.history()["step"]) == 0


# ----------------------------------------------------------------------------- helpers


class _NullWriter:
    """A writer-like object that writes nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _saved(obj: object) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
