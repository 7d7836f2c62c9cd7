"""The TensorBoard sink: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import io
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch as gw
from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.observation import Decision, Detection, Observation, RemedyInput
from gradwatch.report import build_report
from gradwatch.sinks.flow import GradientFlow
from gradwatch.sinks.png import encode_png
from gradwatch.sinks.schema import parse_alert_markdown
from gradwatch.sinks.tensorboard import TensorBoardSink

STEPS = 12
LOG_EVERY = 5
GRAD_TAG = "gradwatch/grad_norm/"


class RootScaled(nn.Module):
    """Two Linear layers and a parameter owned by the root module (layer ``""``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


class FiresFromStep(gw.Detector):
    """Test-only detector: a SPIKE at every step from ``start`` on, blaming layer ``body.0``."""

    kind = AlertKind.SPIKE

    def __init__(self, start: int) -> None:
        super().__init__(threshold=1.0)
        self.start = start

    def observe(self, obs: Observation) -> Detection:
        fired = torch.tensor(obs.steps[0] >= self.start)
        names = self.candidate_names()
        scores = torch.tensor([1.0 if name == "body.0" else 0.0 for name in names])
        return Detection(fired=fired, value=torch.tensor(2.5), scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return f"test spike of {value:g} in {', '.join(layers)}"


class HalveAndSlow(gw.Remedy):
    """Test-only remedy: halves the gradients and reports an LR scale of 0.25 at every step."""

    clips = True
    scales_lr = True

    def decide(self, view: RemedyInput) -> Decision:
        return Decision(clip_coef=torch.tensor(0.5), lr_scale=0.25)


class RecordingWriter:
    """A writer-like object with SummaryWriter's add_* methods that only records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.flushed = 0

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("add_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def flush(self) -> None:
        self.flushed += 1


class BrokenWriter:
    """A writer whose disk is full."""

    def __init__(self) -> None:
        self.attempts = 0

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        self.attempts += 1
        raise OSError(28, "No space left on device")


def train(watch: gw.GradWatch, model: nn.Module, steps: int = STEPS) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        watch.step(loss=loss)
        optimizer.step()
        optimizer.zero_grad()


def summaries_of(logdir: Path) -> list[Any]:
    """The events of the one event file in ``logdir`` that hold a summary, in file order."""
    (event_file,) = logdir.glob("events.out.tfevents.*")
    return [e for e in EventFileLoader(str(event_file)).Load() if e.HasField("summary")]


def image_steps(summaries: list[Any]) -> list[int]:
    """Steps of the gradient-flow images among ``summaries``."""
    return [e.step for e in summaries if e.summary.value[0].tag == "gradwatch/gradient_flow"]


def accumulate(logdir: Path) -> ea.EventAccumulator:
    guidance = {ea.SCALARS: 0, ea.TENSORS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0}
    return ea.EventAccumulator(str(logdir), size_guidance=guidance).Reload()


def tensorboard_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "TensorBoard" in str(w.message)]


@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
def test_event_files_hold_every_tag_with_the_history_values(
    tmp_path: Path, background: bool
) -> None:
    torch.manual_seed(0)
    model = RootScaled()
    sink = TensorBoardSink(tmp_path, background=background, image_interval=0.0)
    watch = gw.GradWatch(
        model, log_every_n_steps=LOG_EVERY, histogram_every_n_steps=5, detectors=(), sinks=[sink]
    )
    train(watch, model)
    history = watch.history()
    watch.close()

    acc = accumulate(tmp_path)
    scalars = acc.Tags()[ea.SCALARS]
    assert watch.layer_names == ["body.0", "body.2", ""]
    flush_steps = [4, 9, 11]
    for name, tag_name in [("body.0", "body.0"), ("body.2", "body.2"), ("", "<root>")]:
        events = acc.Scalars(GRAD_TAG + tag_name)
        assert [e.step for e in events] == flush_steps
        expected = history[name][np.searchsorted(history["step"], flush_steps)]
        np.testing.assert_allclose([e.value for e in events], expected, rtol=1e-6)
        assert f"gradwatch/weight_norm/{tag_name}" in scalars
    total = acc.Scalars("gradwatch/grad_norm_total")
    assert [e.step for e in total] == list(range(STEPS))
    layer_norms = np.stack([history[name] for name in watch.layer_names], axis=1)
    np.testing.assert_allclose(
        [e.value for e in total], np.sqrt((layer_norms.astype(np.float64) ** 2).sum(1)), rtol=1e-5
    )
    assert "gradwatch/clip_coef" not in scalars and "gradwatch/lr_scale" not in scalars
    assert [e.step for e in acc.Histograms("gradwatch/grad_hist/body.0")] == [0, 5, 10]
    images = acc.Images("gradwatch/gradient_flow")
    assert images and images[-1].step == STEPS - 1
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")


def test_custom_scalars_layout_is_written_once_overview_first(tmp_path: Path) -> None:
    model = RootScaled()
    watch = gw.GradWatch(model, logdir=tmp_path, log_every_n_steps=LOG_EVERY, detectors=())
    train(watch, model)
    watch.close()
    acc = accumulate(tmp_path)
    configs = acc.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout.FromString(configs[0].tensor_proto.string_val[0])
    overview, per_layer = layout.category
    assert not overview.closed and per_layer.closed  # the overview is what opens first
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert {
        "gradient norm per layer",
        "weight norm per layer",
        "update/weight ratio per layer",
        "total gradient norm (before remedies)",
    } <= set(charts)
    assert not any("clip" in title for title in charts)  # no remedy: no remedy chart
    scalar_tags = acc.Tags()[ea.SCALARS]

    def shown(title_start: str) -> set[str]:
        title = min(t for t in charts if t.startswith(title_start))  # the shortest such title
        return {tag for tag in scalar_tags if any(re.search(p, tag) for p in charts[title])}

    assert shown("gradient norm per layer") == {
        GRAD_TAG + n for n in ("body.0", "body.2", "<root>")
    }
    assert shown("log10 gradient norm by depth") == {
        f"gradwatch/depth/{band}_log10" for band in ("input_third", "middle_third", "output_third")
    }
    assert shown("log10 total gradient norm") == {
        "gradwatch/depth/all_layers_log10",
        "gradwatch/depth/all_layers_peak_log10",
    }
    assert shown("total gradient norm") == {"gradwatch/grad_norm_total"}


def test_gradient_flow_image_keeps_within_its_cpu_budget(tmp_path: Path) -> None:
    # A drawing takes milliseconds of CPU: the next waits IMAGE_BUDGET times that, so flushes in
    # quick succession (written on this thread) get no new image until close.
    model = RootScaled()
    sink = TensorBoardSink(tmp_path, background=False, image_interval=1e-6)
    watch = gw.GradWatch(model, log_every_n_steps=LOG_EVERY, detectors=(), sinks=[sink])
    train(watch, model)
    watch.close()
    assert image_steps(summaries_of(tmp_path)) == [LOG_EVERY - 1, STEPS - 1]  # first flush, close


def test_scalars_of_one_step_share_one_event(tmp_path: Path) -> None:
    model = RootScaled()
    sink = TensorBoardSink(tmp_path, image_interval=1e9)  # the first image is due at close
    watch = gw.GradWatch(model, log_every_n_steps=LOG_EVERY, detectors=(), sinks=[sink])
    train(watch, model)
    watch.close()
    summaries = summaries_of(tmp_path)
    images = image_steps(summaries)
    # At most one image before close (the interval has not passed) and one at close.
    assert 1 <= len(images) <= 2 and images[-1] == STEPS - 1
    assert all((step + 1) % LOG_EVERY == 0 or step == STEPS - 1 for step in images)
    # one event per step, plus the custom-scalars layout and the gradient-flow images
    assert len(summaries) == STEPS + 1 + len(images)
    last = next(e for e in summaries if e.step == 9)
    # total norm, 5 depth bands; per layer (3): last, window max/min/median, weight norm
    assert len(last.summary.value) == 1 + 5 + 3 * 5


def test_clip_coef_lr_scale_and_update_ratio(tmp_path: Path) -> None:
    model = RootScaled()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.GradWatch(
        model,
        optimizer,
        logdir=tmp_path,
        log_every_n_steps=LOG_EVERY,
        detectors=(),
        remedies=[HalveAndSlow()],
        track_updates=True,
    )
    train(watch, model)
    watch.close()
    acc = accumulate(tmp_path)
    clip = acc.Scalars("gradwatch/clip_coef")
    lr_scale = acc.Scalars("gradwatch/lr_scale")
    assert [e.step for e in clip] == list(range(STEPS)) == [e.step for e in lr_scale]
    assert {e.value for e in clip} == {0.5} and {e.value for e in lr_scale} == {0.25}
    ratios = acc.Scalars("gradwatch/update_ratio/body.0")
    assert ratios and all(e.value > 0 for e in ratios)


def test_alerts_are_written_as_text_and_counts(tmp_path: Path) -> None:
    model = RootScaled()
    watch = gw.GradWatch(
        model, logdir=tmp_path / "run", log_every_n_steps=LOG_EVERY, detectors=[FiresFromStep(3)]
    )
    train(watch, model)
    watch.close()
    assert [a.step for a in watch.alerts] == [3]
    acc = accumulate(tmp_path / "run")
    counts = acc.Scalars("gradwatch/alerts/spike")
    # 0 just before the alert, 1 at its step, then 1 at every flush: a step, not a ramp
    assert [(e.step, e.value) for e in counts] == [
        (2, 0.0),
        (3, 1.0),
        (4, 1.0),
        (9, 1.0),
        (11, 1.0),
    ]
    (log_event,) = acc.Tensors("gradwatch/alert_log")
    assert (
        log_event.step == 3  # delivered at once (early flush), not at the flush of step 4
        and "1. step 3: **spike**" in log_event.tensor_proto.string_val[0].decode()
    )
    (text_event,) = acc.Tensors("gradwatch/alerts")
    assert text_event.step == 3
    text = text_event.tensor_proto.string_val[0].decode()
    parsed = parse_alert_markdown(text)
    assert parsed is not None
    assert (parsed.kind, parsed.step, parsed.layers) == ("spike", 3, ["body.0"])
    assert parsed.message == "test spike of 2.5 in body.0"
    assert tuple(parsed.advice) == watch.alerts[0].advice and parsed.advice
    report = build_report(tmp_path)
    assert "step 3: SPIKE (warning) in body.0" in report
    assert "<root>" in report


def test_no_alert_text_when_nothing_fires(tmp_path: Path) -> None:
    model = RootScaled()
    watch = gw.GradWatch(model, logdir=tmp_path, log_every_n_steps=LOG_EVERY, detectors=())
    train(watch, model)
    watch.close()
    tags = accumulate(tmp_path).Tags()
    assert "gradwatch/alerts" not in tags[ea.TENSORS]
    assert not [t for t in tags[ea.SCALARS] if t.startswith("gradwatch/alerts/")]


def test_writer_like_objects_get_the_same_tags_through_add_calls() -> None:
    model = RootScaled()
    writer = RecordingWriter()
    watch = gw.GradWatch(
        model,
        writer=writer,
        log_every_n_steps=LOG_EVERY,
        histogram_every_n_steps=5,
        detectors=[FiresFromStep(3)],
    )
    train(watch, model)
    watch.close()
    by_method: dict[str, list[tuple[Any, ...]]] = {}
    for method, args, kwargs in writer.calls:
        by_method.setdefault(method, []).append((args, kwargs))
    assert len(by_method["add_custom_scalars"]) == 1
    scalar_tags = {args[0] for args, _ in by_method["add_scalar"]}
    assert {
        "gradwatch/grad_norm_total",
        "gradwatch/grad_norm/<root>",
        "gradwatch/alerts/spike",
    } <= scalar_tags
    totals = [args for args, _ in by_method["add_scalar"] if args[0] == "gradwatch/grad_norm_total"]
    assert [args[2] for args in totals] == list(range(STEPS))
    assert [args[0] for args, _ in by_method["add_text"]] == [
        "gradwatch/alerts",
        "gradwatch/alert_log",
    ]
    image_args, image_kwargs = by_method["add_image"][-1]
    assert image_args[0] == "gradwatch/gradient_flow" and image_kwargs == {"dataformats": "HWC"}
    assert (
        image_args[1].ndim == 3 and image_args[1].shape[2] == 3 and image_args[1].dtype == np.uint8
    )
    histogram_kwargs = by_method["add_histogram_raw"][0][1]
    assert set(histogram_kwargs) >= {"bucket_limits", "bucket_counts", "global_step", "num"}
    assert writer.flushed >= 1  # a writer we did not create is flushed, not closed


@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
def test_a_failing_writer_warns_once_and_training_goes_on(background: bool) -> None:
    model = RootScaled()
    writer = BrokenWriter()
    sink = TensorBoardSink(writer=writer, background=background)
    watch = gw.GradWatch(model, log_every_n_steps=2, detectors=[FiresFromStep(7)], sinks=[sink])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(watch, model, steps=20)
        watch.close()
    assert len(tensorboard_warnings(caught)) == 1
    assert "No space left on device" in tensorboard_warnings(caught)[0]
    assert writer.attempts == 1  # disabled after the first failure
    assert list(watch.history()["step"]) == list(range(20))
    assert [a.step for a in watch.alerts] == [7]
    assert not [t for t in threading.enumerate() if t.name == "gradwatch-tensorboard"]


def test_a_summary_writer_whose_disk_fails_warns_once(tmp_path: Path) -> None:
    model = RootScaled()
    writer = SummaryWriter(str(tmp_path))

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    writer._get_file_writer().add_summary = disk_full  # type: ignore[method-assign]
    watch = gw.GradWatch(model, writer=writer, log_every_n_steps=2, detectors=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(watch, model, steps=10)
        watch.close()
    writer.close()
    assert len(tensorboard_warnings(caught)) == 1
    assert len(watch.history()["step"]) == 10


def test_a_logdir_that_cannot_be_created_warns_once(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the run directory should go")
    model = RootScaled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = gw.GradWatch(
            model, logdir=blocker / "run", log_every_n_steps=2, detectors=[FiresFromStep(3)]
        )
        train(watch, model, steps=8)
        watch.close()
    messages = tensorboard_warnings(caught)
    assert len(messages) == 1 and "disabled" in messages[0]
    assert len(watch.history()["step"]) == 8
    assert [a.step for a in watch.alerts] == [3]


def test_close_drains_the_queue_and_stops_the_thread(tmp_path: Path) -> None:
    model = RootScaled()
    sink = TensorBoardSink(tmp_path)
    watch = gw.GradWatch(model, log_every_n_steps=1, detectors=(), sinks=[sink])
    train(watch, model, steps=30)
    watch.close()
    assert not [t for t in threading.enumerate() if t.name == "gradwatch-tensorboard"]
    assert len(accumulate(tmp_path).Scalars("gradwatch/grad_norm/body.0")) == 30


def test_gradient_flow_stays_bounded_and_spans_the_run() -> None:
    flow = GradientFlow(max_columns=8)
    norms = 10.0 ** -np.arange(3, dtype=np.float64)[None, :].repeat(100, axis=0)
    flow.add(np.arange(100), norms)
    grid = flow.grid()
    assert grid.shape[0] == 3 and grid.shape[1] <= 8
    assert flow.stride == 16 and flow.first_step == 0 and flow.last_step == 99
    assert grid.shape[1] == 7  # 6 full columns of 16 steps and the last 4 steps
    np.testing.assert_allclose(grid, np.array([[0.0], [-1.0], [-2.0]]).repeat(grid.shape[1], 1))


def test_plain_gradient_flow_marks_nonfinite_steps() -> None:
    flow = GradientFlow(max_columns=8)
    norms = np.ones((4, 2))
    norms[2, 1] = np.nan
    flow.add(np.arange(4), norms)
    image = flow.render(["a", "b"], plot=None)
    assert image is not None and image.dtype == np.uint8 and image.shape[2] == 3
    magenta = np.all(image == [255, 0, 255], axis=2)
    rows = np.nonzero(magenta)[0]
    assert magenta.any() and rows.min() >= image.shape[0] // 2  # only in the second layer's row


def test_png_encoding_round_trips() -> None:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(pixels))).convert("RGB"))
    np.testing.assert_array_equal(decoded, pixels)


# ----------------------------------------------------------------------------- nothing lost


def train_with_incidents(watch: gw.GradWatch, model: nn.Module, spike: int, nan: int) -> None:
    """Trains ``STEPS`` steps; at step ``spike`` the first layer's gradient is 1e4 times larger,
    at step ``nan`` one of its elements is NaN (neither is a log step)."""
    torch.manual_seed(1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    first = model.body[0].weight
    for step in range(STEPS):
        nn.functional.mse_loss(model(x), y).backward()
        if step == spike:
            first.grad.mul_(1e4)
        if step == nan:
            first.grad[0, 0] = float("nan")
        watch.step()
        model.zero_grad()


def test_window_summaries_keep_what_happens_between_log_steps(tmp_path: Path) -> None:
    model = RootScaled()
    watch = gw.GradWatch(model, logdir=tmp_path, log_every_n_steps=LOG_EVERY, detectors=())
    train_with_incidents(watch, model, spike=2, nan=7)
    history = watch.history()
    watch.close()
    acc = accumulate(tmp_path)
    spike = float(history["body.0"][2])
    assert spike > 100 * float(history["body.0"][4])
    top = acc.Scalars("gradwatch/grad_norm_max/body.0")
    assert [e.step for e in top] == [4, 9, 11]
    assert top[0].value == pytest.approx(spike, rel=1e-6)  # step 2 is not a log step
    assert acc.Scalars("gradwatch/grad_norm/body.0")[0].value < spike / 100
    low = acc.Scalars("gradwatch/grad_norm_min/body.0")[0].value
    assert low == pytest.approx(float(np.min(history["body.0"][:5])), rel=1e-6)
    median = acc.Scalars("gradwatch/grad_norm_median/body.0")[0].value
    assert median == pytest.approx(float(np.median(history["body.0"][:5])), rel=1e-6)
    nonfinite = acc.Scalars("gradwatch/grad_norm_nonfinite/body.0")
    assert [(e.step, e.value) for e in nonfinite] == [(9, 1.0)]  # written only when it happens
    assert "gradwatch/grad_norm_nonfinite/body.2" not in acc.Tags()[ea.SCALARS]


def test_window_summaries_survive_a_round_trip_through_the_report(tmp_path: Path) -> None:
    from gradwatch.report import load_reports, report_json

    model = RootScaled()
    watch = gw.GradWatch(model, logdir=tmp_path, log_every_n_steps=LOG_EVERY, detectors=())
    train_with_incidents(watch, model, spike=2, nan=7)
    history = watch.history()
    watch.close()
    (report,) = load_reports(tmp_path)
    rows = {row.name: row for row in report.layers}
    assert list(rows) == ["body.0", "body.2", "<root>"]
    first = history["body.0"]
    finite = first[np.isfinite(first)]
    assert rows["body.0"].high == pytest.approx(float(finite.max()), rel=1e-6)
    assert rows["body.0"].low == pytest.approx(float(finite.min()), rel=1e-6)
    assert rows["body.0"].nonfinite == 1 and rows["body.2"].nonfinite == 0
    assert report.total_peak_step == 2 and report.total_nonfinite == 1
    text = build_report(tmp_path)
    assert "NaN/Inf steps" in text and "peak" in text
    layer = report_json([report])["runs"][0]["layers"][0]
    assert layer["max"] == pytest.approx(float(finite.max()), rel=1e-6)
    assert layer["nonfinite_steps"] == 1


def test_depth_bands_are_log10_norms_of_each_third_at_every_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(7)])  # thirds: 3, 2, 2 layers
    watch = gw.GradWatch(model, logdir=tmp_path, log_every_n_steps=4, detectors=())
    x = torch.randn(8, 4)
    for step in range(6):
        model(x).pow(2).mean().backward()
        if step == 3:
            model[6].weight.grad[0, 0] = float("inf")
        watch.step()
        model.zero_grad()
    history = watch.history()
    watch.close()
    norms = np.stack([history[name] for name in watch.layer_names], axis=1).astype(np.float64)
    acc = accumulate(tmp_path)
    for band, layers in [("input_third", slice(0, 3)), ("middle_third", slice(3, 5))]:
        events = acc.Scalars(f"gradwatch/depth/{band}_log10")
        assert [e.step for e in events] == list(range(6))
        expected = np.log10(np.sqrt((norms[:, layers] ** 2).sum(1)))
        np.testing.assert_allclose([e.value for e in events], expected, rtol=1e-5)
    output = [e.value for e in acc.Scalars("gradwatch/depth/output_third_log10")]
    assert np.isnan(output[3]) and np.isfinite(output).sum() == 5  # Inf is written as NaN
    peak = [e.value for e in acc.Scalars("gradwatch/depth/all_layers_peak_log10")]
    total = [e.value for e in acc.Scalars("gradwatch/depth/all_layers_log10")]
    assert peak == pytest.approx(np.fmax.accumulate(np.where(np.isnan(total), -np.inf, total)))


def test_alert_log_lists_every_alert_oldest_first() -> None:
    from gradwatch.engine.alerts import Alert
    from gradwatch.sinks.schema import MAX_LOGGED_ALERTS, format_alert_log

    def alert(step: int) -> Alert:
        return Alert(AlertKind.SPIKE, step, ("fc",), 9.0, 6.0, "warning", f"spike {step}")

    log = format_alert_log([alert(30), alert(0), alert(12)])
    lines = [line for line in log.splitlines() if line[:1].isdigit()]
    assert [line.split(":")[0] for line in lines] == ["1. step 0", "2. step 12", "3. step 30"]
    long = format_alert_log([alert(step) for step in range(MAX_LOGGED_ALERTS + 50)])
    assert "1. step 0:" in long and f"{MAX_LOGGED_ALERTS + 50}. step" in long
    assert "50 alerts left out" in long


# ----------------------------------------------------------------------------- gradient flow


def test_gradient_flow_keeps_nan_inf_and_spikes_visible_after_merging() -> None:
    from gradwatch.sinks.flow import NONFINITE_COLOUR, ZERO_COLOUR, colour_cells

    flow = GradientFlow(max_columns=8)
    norms = np.full((300, 3), 1e-2)
    norms[37, 1] = np.nan
    norms[70, 0] = np.inf
    norms[200, 1] = 1e5  # a spike among 32 steps of one merged column
    norms[:, 2] = 0.0
    flow.add(np.arange(300), norms)
    grid = flow.grid()
    assert grid.shape[1] <= 8 and flow.stride == 64
    assert np.isnan(grid[1, 37 // 64]) and np.isnan(grid[0, 70 // 64])
    assert grid[1, 200 // 64] == pytest.approx(5.0)  # the largest of its steps, not the mean
    assert flow.stride * (grid.shape[1] - 1) < 300 <= flow.stride * grid.shape[1]  # no step lost
    assert np.isneginf(grid[2]).all()
    colours = colour_cells(grid)
    assert tuple(colours[1, 37 // 64]) == NONFINITE_COLOUR == tuple(colours[0, 70 // 64])
    assert tuple(colours[2, 0]) == ZERO_COLOUR


def test_gradient_flow_colours_are_the_same_in_every_run() -> None:
    from gradwatch.sinks.flow import LOG10_RANGE, colour_cells

    quiet = GradientFlow()
    quiet.add(np.arange(4), np.full((4, 1), 1e-3))
    wild = GradientFlow()
    wild.add(np.arange(4), np.array([[1e-3], [1e-7], [1e2], [1e-3]]))
    assert tuple(colour_cells(quiet.grid())[0, 0]) == tuple(colour_cells(wild.grid())[0, 0])
    low, high = LOG10_RANGE
    ends = colour_cells(np.array([[low, low - 3, high, high + 3]]))[0]
    assert (ends[0] == ends[1]).all() and (ends[2] == ends[3]).all()  # beyond: the end colours
    assert not (ends[0] == ends[2]).all()


def test_gradient_flow_plot_is_one_tensorboard_image_card_wide() -> None:
    from gradwatch.sinks.flow import WIDTH_PX, FlowPlot

    flow = GradientFlow()
    norms = np.full((50, 12), 1e-2)
    norms[20, 3] = np.nan
    flow.add(np.arange(50), norms)
    image = flow.render([f"encoder.layers.{i}.q_proj" for i in range(12)], FlowPlot())
    assert image is not None and image.shape[1] == WIDTH_PX == 350 and image.dtype == np.uint8
    assert np.all(image == [255, 0, 255], axis=2).any()  # the NaN cell is drawn
