"""The TensorBoard sink: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import io
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


def test_custom_scalars_layout_is_written_once_with_one_chart_per_family(tmp_path: Path) -> None:
    model = RootScaled()
    watch = gw.GradWatch(model, logdir=tmp_path, log_every_n_steps=LOG_EVERY, detectors=())
    train(watch, model)
    watch.close()
    acc = accumulate(tmp_path)
    configs = acc.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout.FromString(configs[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert set(charts) == {
        "gradient norm per layer",
        "weight norm per layer",
        "update/weight ratio per layer",
        "total gradient norm, clip coefficient, LR scale",
    }
    import re

    grad_tags = [t for t in acc.Tags()[ea.SCALARS] if t.startswith(GRAD_TAG)]
    assert len(grad_tags) == 3
    assert all(re.search(charts["gradient norm per layer"][0], tag) for tag in grad_tags)
    assert not re.search(charts["gradient norm per layer"][0], "gradwatch/grad_norm_total")


def test_scalars_of_one_step_share_one_event(tmp_path: Path) -> None:
    model = RootScaled()
    sink = TensorBoardSink(tmp_path, image_interval=1e9)  # images at the first flush and at close
    watch = gw.GradWatch(model, log_every_n_steps=LOG_EVERY, detectors=(), sinks=[sink])
    train(watch, model)
    watch.close()
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    summaries = [e for e in EventFileLoader(str(event_file)).Load() if e.HasField("summary")]
    images = [e.step for e in summaries if e.summary.value[0].tag == "gradwatch/gradient_flow"]
    # One image at the first flush the writer thread handles (flushes queued while it is busy are
    # coalesced into one image, so which flush depends on timing) and one at close.
    assert 1 <= len(images) <= 2 and images[-1] == STEPS - 1
    assert all((step + 1) % LOG_EVERY == 0 or step == STEPS - 1 for step in images)
    # one event per step, plus the custom-scalars layout and the gradient-flow images
    assert len(summaries) == STEPS + 1 + len(images)
    last = next(e for e in summaries if e.step == 9)
    assert len(last.summary.value) == 1 + 2 * 3  # total norm, 3 gradient and 3 weight norms


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
    assert [(e.step, e.value) for e in counts] == [(4, 1.0)]  # written once: it never changes
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
    assert [args[0] for args, _ in by_method["add_text"]] == ["gradwatch/alerts"]
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
    sink = TensorBoardSink(tmp_path, queue_size=1)
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
