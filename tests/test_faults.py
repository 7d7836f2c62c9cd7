"""Fault injection: writers that hang or crawl, remedies and callbacks that fail, interrupts, exits
without ``close()``, odd values, a second thread, odd parameters and bad configuration. Training
goes on with at most one warning per fault, and nothing recorded is lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn

import gradwatch as gw
from gradwatch.engine.observation import Decision, RemedyInput
from gradwatch.sinks.tensorboard import TensorBoardSink
from tests.helpers import RecordingSink, reference_norms

TOTAL_TAG = "gradwatch/grad_norm_total"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def train(
    model: nn.Module,
    watch: gw.GradWatch,
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    poison: Callable[[int], bool] = lambda step: False,
) -> None:
    """``steps`` steps of a regression; a ``poison`` step has a NaN loss."""
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        loss = model(torch.randn(16, 4, generator=generator)).pow(2).mean()
        if poison(step):
            loss = loss * float("nan")
        loss.backward()
        report = watch.step(loss=loss)
        if optimizer is not None and not report.skipped:
            optimizer.step()
        model.zero_grad()


def recorded(sink: RecordingSink) -> list[int]:
    return [int(step) for record in sink.records for step in record.steps]


def gradwatch_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "gradwatch" in str(w.message).lower()]


# ----------------------------------------------------------------------------- writers


class GatedWriter:
    """A writer-like object whose ``add_*`` calls wait for ``gate`` (set: they return at once),
    sleeping ``delay`` seconds each; counts the records (``add_scalar`` of the total norm)."""

    def __init__(self, *, delay: float = 0.0, hung: bool = False) -> None:
        self.gate = threading.Event()
        if not hung:
            self.gate.set()
        self.delay = delay
        self.totals: list[int] = []

    def add_scalar(self, tag: str, value: float, global_step: int, **kwargs: Any) -> None:
        self.gate.wait()
        time.sleep(self.delay)
        if tag == TOTAL_TAG:
            self.totals.append(global_step)

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not name.startswith("add_"):
            raise AttributeError(name)

        def add(*args: Any, **kwargs: Any) -> None:
            self.gate.wait()
            time.sleep(self.delay)

        return add


def test_a_hung_writer_never_blocks_training_and_close_waits_a_bounded_time() -> None:
    model = mlp()
    writer = GatedWriter(hung=True)
    sink = TensorBoardSink(writer=writer, backlog_bytes=0, close_timeout=0.2)
    watch = gw.GradWatch(model, log_every_n_steps=1, sinks=[sink], detectors=())
    caught: list[warnings.WarningMessage] = []

    def loop() -> None:  # every step flushes to a writer stuck in its first call
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(model, watch, 60)
            watch.close()  # returns after close_timeout
        caught.extend(seen)

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join(timeout=120)  # a step or close() waiting for the writer would stay here
    writer.gate.set()  # let the abandoned writer thread end
    assert not thread.is_alive()
    messages = gradwatch_warnings(caught)
    assert len([m for m in messages if "behind" in m]) == 1
    assert len([m for m in messages if "did not finish within 0.2 s" in m]) == 1
    assert len(messages) == 2
    assert watch.history()["step"].tolist() == list(range(60))  # training recorded every step
    assert sink.dropped in (58, 59)  # one record in the hung call (or none), the newest waiting


def test_a_slow_writer_does_not_hold_training_back() -> None:
    model = mlp()
    writer = GatedWriter(delay=0.02)  # 20 ms per add_* call, about 5 calls per record
    sink = TensorBoardSink(writer=writer, backlog_bytes=0, close_timeout=30.0)
    watch = gw.GradWatch(model, log_every_n_steps=1, sinks=[sink], detectors=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, watch, 50)
        written_while_training = len(writer.totals)
        watch.close()
    # The loop handed over 50 records in the time the writer needs for a few: it never waited.
    assert written_while_training < 25
    assert len([m for m in gradwatch_warnings(caught) if "behind" in m]) == 1
    assert writer.totals[-1] == 49  # the newest record is always kept and written at close
    assert len(writer.totals) + sink.dropped == 50
    assert writer.totals == sorted(writer.totals)


_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import gradwatch as gw
    from gradwatch.sinks.tensorboard import TensorBoardSink

    mode, logdir = sys.argv[1], sys.argv[2]

    class Hung:
        def __getattr__(self, name):
            return lambda *args, **kwargs: time.sleep(3600)

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        if mode == "hung writer":
            sinks = [TensorBoardSink(writer=Hung(), close_timeout=0.5)]
            watch = gw.GradWatch(model, sinks=sinks, log_every_n_steps=10)
        else:
            watch = gw.GradWatch(model, logdir=logdir)  # flushes every 50 steps
        for _ in range(74):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            watch.step()
            model.zero_grad()
        return watch

    if mode == "function returns":
        run()  # the watch is garbage-collected as run() returns
    else:
        watch = run()  # still referenced at exit
    if mode == "sys.exit":
        sys.exit(3)
    if mode == "KeyboardInterrupt":
        raise KeyboardInterrupt
    """
)


@pytest.mark.parametrize(
    ("mode", "returncodes"),
    [
        ("normal end", {0}),
        ("sys.exit", {3}),
        ("KeyboardInterrupt", {1, -2}),  # Python ends by SIGINT (-2) or exits with 1
        ("function returns", {0}),
    ],
)
def test_every_step_reaches_the_event_file_without_close(
    tmp_path: Path, mode: str, returncodes: set[int]
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode in returncodes, child.stderr
    accumulator = ea.EventAccumulator(str(tmp_path), size_guidance={ea.SCALARS: 0}).Reload()
    assert [e.step for e in accumulator.Scalars(TOTAL_TAG)] == list(range(74))


def test_a_hung_writer_delays_interpreter_exit_by_its_close_timeout_only(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, "hung writer", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,  # without the bounded wait the child would sleep for an hour
    )
    assert child.returncode == 0, child.stderr
    assert "did not finish within 0.5 s" in child.stderr


# ----------------------------------------------------------------------------- remedies


class Failing(gw.Remedy):
    """A remedy whose every decision raises ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def decide(self, view: RemedyInput) -> Decision:
        raise self.error


def test_a_failing_remedy_is_disabled_and_the_ones_after_it_still_act() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = RecordingSink()
    failing = Failing(RuntimeError("boom"))
    watch = gw.GradWatch(
        model, optimizer, remedies=[failing, gw.SkipStep()], log_every_n_steps=4, sinks=[sink]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, watch, 10, optimizer, poison=lambda step: step == 5)
        watch.close()
    assert [m for m in gradwatch_warnings(caught) if "boom" in m] == gradwatch_warnings(caught)
    assert len(gradwatch_warnings(caught)) == 1
    assert failing not in watch.remedies and len(watch.remedies) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was skipped
    assert recorded(sink) == list(range(10))  # no step lost or renumbered, every flush worked
    assert [(a.kind, a.step) for a in watch.alerts] == [(gw.AlertKind.NONFINITE, 5)]


# ----------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_raised_in_on_alert_finds_the_flush_written(
    interrupt: type[BaseException],
) -> None:
    model = mlp()
    sink = RecordingSink()

    def on_alert(alert: gw.Alert) -> None:
        raise interrupt

    watch = gw.GradWatch(model, log_every_n_steps=5, sinks=[sink], on_alert=on_alert)
    with pytest.raises(interrupt):
        train(model, watch, 10, poison=lambda step: step == 2)
    # the NaN of step 2 is delivered at once (early flush): the sinks had its alert first
    assert [a.step for r in sink.records for a in r.new_alerts] == [2]
    assert watch.history()["step"].tolist() == [0, 1, 2]
    watch.close()
    assert recorded(sink) == [0, 1, 2]  # its steps follow with the last flush: nothing lost


def test_an_exception_in_on_alert_is_one_warning() -> None:
    model = mlp()

    def on_alert(alert: gw.Alert) -> None:
        raise ValueError("callback bug")

    watch = gw.GradWatch(model, log_every_n_steps=2, on_alert=on_alert)
    with pytest.warns(RuntimeWarning, match="callback bug") as caught:
        train(model, watch, 10, poison=lambda step: step in (2, 7))
    assert len(gradwatch_warnings(list(caught))) == 1
    assert watch.step_count == 10


# ----------------------------------------------------------------------------- odd values


@pytest.mark.parametrize(
    "global_step", [2**63, 2**62 + 1, -1, "7", 3.0, True], ids=lambda value: repr(value)
)
def test_a_bad_global_step_is_ignored_and_the_history_kept(global_step: object) -> None:
    model = mlp()
    watch = gw.GradWatch(model, log_every_n_steps=2)
    train(model, watch, 3)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    with pytest.warns(RuntimeWarning, match="global_step"):
        watch.step(global_step=global_step)  # type: ignore[arg-type]
    model.zero_grad()
    train(model, watch, 2)
    assert watch.history()["step"].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "loss",
    ["abc", {"loss": 1.0}, torch.empty((), device="meta"), torch.tensor(1j), [1.0, "x"]],
    ids=["str", "dict", "meta", "complex", "list"],
)
def test_a_bad_loss_is_dropped_and_the_gradients_kept(loss: object) -> None:
    model = mlp()
    watch = gw.GradWatch(model, log_every_n_steps=2)
    train(model, watch, 2)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    expected = reference_norms(model, ["0", "2"])
    with pytest.warns(RuntimeWarning, match="loss"):
        watch.step(loss=loss)
    model.zero_grad()
    assert watch.last_norms() == pytest.approx(expected, rel=1e-5)
    train(model, watch, 2)
    assert watch.history()["step"].tolist() == [0, 1, 2, 3, 4]
    assert watch.alerts == []


def test_a_huge_finite_float64_loss_is_finite() -> None:
    model = mlp()
    watch = gw.GradWatch(model, log_every_n_steps=1, detectors=[gw.NonFiniteDetector()])
    for loss in (1e300, torch.tensor(1e300, dtype=torch.float64), torch.tensor(float("inf"))):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        watch.step(loss=loss)
        model.zero_grad()
    assert [(a.kind, a.step) for a in watch.alerts] == [(gw.AlertKind.NONFINITE, 2)]


# ----------------------------------------------------------------------------- odd parameters


class ComplexMixer(nn.Module):
    """A real layer, a complex parameter owned by the root, a real head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 8)
        self.mix = nn.Parameter(torch.randn(8, 8, dtype=torch.complex64) / 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((torch.relu(self.encoder(x)).to(torch.complex64) @ self.mix).abs())


@pytest.mark.parametrize(
    "remedies",
    [[], [gw.AGC(exclude=())], [gw.ClipNorm(0.01)], [gw.AutoClip(), gw.ZClip(), gw.SkipStep()]],
    ids=["none", "agc", "clipnorm", "others"],
)
def test_complex_parameters_are_watched_by_the_norm_of_their_gradients(
    remedies: list[gw.Remedy],
) -> None:
    model = ComplexMixer()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(
        model, optimizer, remedies=remedies, log_every_n_steps=3, histogram_every_n_steps=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        train(model, watch, 6, optimizer)
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        expected = {"": float(model.mix.grad.abs().pow(2).sum().sqrt())}  # type: ignore[union-attr]
        expected |= reference_norms(model, ["encoder", "head"])
        watch.step(loss=loss)
    assert watch.last_norms() == pytest.approx(expected, rel=1e-5)
    assert watch.history()["step"].tolist() == list(range(7))
    watch.close()


def test_agc_on_float64_parameters_clips_in_float64() -> None:
    model = mlp().double()
    watch = gw.GradWatch(model, remedies=[gw.AGC(clipping=1e-3, exclude=())])
    model(torch.randn(16, 4, dtype=torch.float64)).pow(2).mean().mul(100).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = watch.step()
    weight, grad = model[0].weight.detach(), model[0].weight.grad
    assert grad is not None and report.clip_coef is not None and float(report.clip_coef) < 1
    unit = weight.norm(dim=1).clamp(min=1e-3) * 1e-3
    assert torch.all(grad.norm(dim=1) <= unit * (1 + 1e-9))


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_outputs_through_activation_modules_are_skipped(layout: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    watch = gw.GradWatch(model, check_activations=True, log_every_n_steps=1)
    dense = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "sparse CSR support is in beta"
        warnings.simplefilter("error", RuntimeWarning)
        sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
        model[1](sparse)  # a sparse tensor through nn.ReLU
        model(dense).sum().backward()
        watch.step()
    assert watch.step_count == 1
    watch.close()


def test_an_optimizer_without_lr_is_left_alone_by_lr_backoff() -> None:
    class NoLR(torch.optim.Optimizer):
        """Sign descent with a fixed step: its param groups have no 'lr'."""

        def __init__(self, params: Any) -> None:
            super().__init__(params, {"step_size": 1e-3})

        def step(self, closure: Any = None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.data.add_(p.grad.sign(), alpha=-group["step_size"])

    model = mlp()
    optimizer = NoLR(model.parameters())
    watch = gw.GradWatch(model, optimizer, remedies=[gw.LRBackoff()]).attach()
    with pytest.warns(RuntimeWarning, match="no 'lr'") as caught:
        for _ in range(5):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert len(gradwatch_warnings(list(caught))) == 1
    assert watch.step_count == 5 and "lr" not in optimizer.param_groups[0]
    watch.close()


# ----------------------------------------------------------------------------- threads


class StepCoded(nn.Module):
    """Two layers whose gradient norms encode the step ``s``: ``a`` reads ``s + 1``, ``b`` twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False)
        self.b = nn.Linear(1, 1, bias=False)

    def loss(self, step: int) -> torch.Tensor:
        return (step + 1) * (self.a.weight.sum() + 2 * self.b.weight.sum())


def test_reads_from_another_thread_see_every_step_under_its_own_number() -> None:
    model = StepCoded()
    watch = gw.GradWatch(model, log_every_n_steps=7, window=10_000)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            history = watch.history()
            steps, a, b = history["step"], history["a"], history["b"]
            if not (np.array_equal(a, steps + 1) and np.array_equal(b, 2 * (steps + 1))):
                problems.append(f"history misattributed at steps {steps[-3:]}")
            norms = watch.last_norms()
            if norms and norms["b"] != 2 * norms["a"]:
                problems.append(f"last_norms mixes steps: {norms}")
            watch.summary()
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for step in range(300):
        model.loss(step).backward()
        watch.step()
        model.zero_grad()
    reads_while_training = reads[0]
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    watch.close()
    assert not problems, problems[:3]
    assert reads_while_training >= 3
    history = watch.history()
    assert history["step"].tolist() == list(range(300))
    np.testing.assert_array_equal(history["a"], np.arange(1, 301))


def test_a_read_during_the_first_forward_does_not_freeze_half_a_forward_order() -> None:
    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 1)
            self.body = nn.Linear(8, 8)
            self.stem = nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))

    model = Reordered()
    watch = gw.GradWatch(model)
    seen: list[list[str]] = []
    # What a reader thread could see between the two layers of the first forward:
    model.stem.register_forward_hook(lambda *_: seen.append(watch.layer_names))
    model(torch.randn(2, 4)).sum().backward()
    watch.step()
    assert seen == [["head", "body", "stem"]]  # registration order until a whole forward ran
    assert watch.layer_names == ["stem", "body", "head"]
    watch.close()


# ----------------------------------------------------------------------------- configuration


def _other_parameters() -> Any:
    return nn.Linear(2, 2).parameters()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"writer": "w"}, TypeError, "writer must be a SummaryWriter.*'w'"),
        ({"writer": 5}, TypeError, "writer must be a SummaryWriter.*5"),
        ({"writer": object()}, TypeError, "writer must be a SummaryWriter.*object"),
        ({"scaler": "yes"}, TypeError, "scaler must be a torch.amp.GradScaler.*'yes'"),
        ({"check_activations": "no"}, TypeError, "check_activations must be True or False.*'no'"),
        ({"window": 10**15}, ValueError, "window must be <= .*1000000000000000"),
        ({"log_every_n_steps": 10**15}, ValueError, "log_every_n_steps must be <= "),
        ({"logdir": b"/abs"}, ValueError, "logdir must be a non-empty str.*b'/abs'"),
        ({"logdir": ""}, ValueError, "logdir must be a non-empty str.*''"),
        ({"sinks": None}, TypeError, "sinks must be a sequence.*None"),
        ({"sinks": [object()]}, TypeError, r"sinks\[0\] must be a gradwatch Sink"),
        ({"params": 5}, TypeError, "params must be an iterable.*5"),
        ({"params": torch.zeros(3)}, TypeError, "params must be an iterable.*tensor"),
        ({"params": [1.0]}, TypeError, r"params\[0\] must be a parameter tensor, got 1.0"),
        ({"params": "_other"}, ValueError, "params= selects none of its trainable parameters"),
        ({"optimizer": "_other"}, ValueError, "optimizer .SGD. updates none of the watched"),
        ({"model": "_script"}, TypeError, "TorchScript"),
    ],
    ids=lambda value: repr(value)[:40] if not isinstance(value, type) else value.__name__,
)
def test_bad_configuration_raises_at_construction_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    optimizer = kwargs.pop("optimizer", None)
    if optimizer == "_other":
        optimizer = torch.optim.SGD(_other_parameters(), lr=0.1)
    if isinstance(kwargs.get("params"), str):
        kwargs["params"] = _other_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
        model = torch.jit.script(mlp()) if kwargs.pop("model", None) == "_script" else mlp()
        with pytest.raises(error, match=match):
            gw.GradWatch(model, optimizer, **kwargs)


def test_autoclip_window_beyond_reason_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"window must be <= .*1000000000000000"):
        gw.AutoClip(window=10**15)
