"""Controls users asked for: watching a subset of layers by name, probing every N steps, and how a
watch shows itself (``repr`` and the notebook view)."""

from __future__ import annotations

import base64
import io
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.observation import Detection, Observation
from gradwatch.lightning import GradWatchCallback
from tests.helpers import count_syncs


class EncoderDecoder(nn.Module):
    """Two encoder layers, a norm, a decoder layer and a parameter of the root module."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.decoder = nn.Linear(8, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.encoder(x))) * self.scale


def backward(model: nn.Module, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    return loss


# ----------------------------------------------------------------------------- include/exclude


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("encoder.*", None, ["encoder.0", "encoder.2"]),
        (None, "encoder.*", ["norm", "decoder", ""]),
        (re.compile(r"^(norm|decoder)$"), None, ["norm", "decoder"]),
        (["decoder", "<root>"], None, ["decoder", ""]),
        ("*", [re.compile("norm"), "<root>"], ["encoder.0", "encoder.2", "decoder"]),
    ],
)
def test_include_and_exclude_select_layers_by_name(
    include: object, exclude: object, expected: list[str]
) -> None:
    model = EncoderDecoder()
    watch = gw.GradWatch(model, include=include, exclude=exclude, detectors=())  # type: ignore[arg-type]
    backward(model)
    watch.step()
    assert watch.layer_names == expected
    assert list(watch.last_norms()) == expected
    watch.close()


def test_include_combines_with_params() -> None:
    model = EncoderDecoder()
    params = [*model.encoder[0].parameters(), *model.decoder.parameters()]
    watch = gw.GradWatch(model, params=params, include="encoder.*", detectors=())
    assert watch.layer_names == ["encoder.0"]
    watch.close()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"include": 3}, TypeError, r"include must be a glob string"),
        ({"exclude": ["ok", b"bytes"]}, TypeError, r"exclude\[1\]"),
        ({"include": "nothing*"}, ValueError, r"include=\('nothing\*',\).*leave none"),
        ({"exclude": "*"}, ValueError, r"exclude=\('\*',\).*leave none of the 5 layers"),
    ],
)
def test_bad_selections_raise_at_construction(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        gw.GradWatch(EncoderDecoder(), **options)  # type: ignore[arg-type]


def test_a_pattern_that_matches_no_layer_warns_once() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = gw.GradWatch(EncoderDecoder(), include=["encoder.*", "encodr.*"], detectors=())
    messages = [str(w.message) for w in caught]
    assert messages == ["gradwatch: include[1] 'encodr.*' matches no layer of the model"]
    assert watch.layer_names == ["encoder.0", "encoder.2"]
    watch.close()


def test_the_lightning_callback_takes_the_same_controls() -> None:
    callback = GradWatchCallback(include="encoder.*", exclude=["*.2"], probe_every_n_steps=3)
    assert callback.config.include == ("encoder.*",)
    assert callback.config.exclude == ("*.2",)
    assert callback.config.probe_every_n_steps == 3


# ----------------------------------------------------------------------------- probe cadence


class FiresOnNonFinite(gw.Detector):
    """Test-only detector: fires when the total norm is NaN/Inf; records what it was told."""

    kind = AlertKind.NONFINITE

    def observe(self, obs: Observation) -> Detection:
        return Detection(fired=~torch.isfinite(obs.totals[0]), value=obs.totals[0])

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return "non-finite total"


def test_probing_every_n_steps_measures_only_those_steps() -> None:
    model = EncoderDecoder()
    detector = FiresOnNonFinite()
    watch = gw.GradWatch(model, log_every_n_steps=5, probe_every_n_steps=3, detectors=[detector])
    assert detector.probe_every_n_steps == 3  # detectors are told the cadence
    reports = []
    for step in range(11):
        backward(model, seed=step)
        if step == 6:
            model.decoder.weight.grad[0, 0] = float("nan")
        reports.append(watch.step())
        model.zero_grad()
    history = watch.history()
    assert list(history["step"]) == [0, 3, 6, 9]
    assert [r.total_norm is not None for r in reports] == [s % 3 == 0 for s in range(11)]
    assert [r.step for r in reports] == list(range(11)) and watch.step_count == 11
    assert [(a.kind, a.step) for a in watch.alerts] == [(AlertKind.NONFINITE, 6)]
    assert reports[6].alerts == watch.alerts  # delivered at once (early flush), not at step 9
    watch.close()


def test_steps_between_probes_read_no_gradient_and_sync_nothing() -> None:
    model = EncoderDecoder()
    watch = gw.GradWatch(model, log_every_n_steps=100, probe_every_n_steps=4)
    backward(model)
    watch.step()  # step 0: probed (and the forward order is settled)
    probe = watch.engine.probe
    calls = []
    original = probe.grad_pattern

    def counting(*args: Any) -> tuple[int, ...]:
        calls.append(1)
        return original(*args)

    probe.grad_pattern = counting  # type: ignore[method-assign]
    for _ in range(3):  # steps 1, 2, 3: between probes
        backward(model)
        with count_syncs() as syncs:
            watch.step()
        assert sum(syncs.values()) == 0
        model.zero_grad()
    assert calls == []
    backward(model)
    watch.step()  # step 4: probed
    assert calls == [1]
    watch.close()


def test_histograms_follow_the_probes() -> None:
    model = EncoderDecoder()
    sink_records = []

    class Keep(gw.Sink):
        def write(self, record: object) -> None:
            sink_records.append(record)

    watch = gw.GradWatch(
        model,
        log_every_n_steps=20,
        probe_every_n_steps=3,
        histogram_every_n_steps=5,
        detectors=(),
        sinks=[Keep()],
    )
    for step in range(20):
        backward(model, seed=step)
        watch.step()
        model.zero_grad()
    watch.close()
    steps = sorted({step for record in sink_records for step, _, _ in record.histograms})
    assert steps == [0, 6, 12, 15]  # probed steps among the first 3 of each window of 5


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"remedies": [gw.ClipNorm(1.0)]}, r"remedies \['ClipNorm'\].*probe_every_n_steps=2"),
        ({"nonfinite": "raise"}, r"nonfinite='raise'.*probe_every_n_steps=2"),
        ({"probe_every_n_steps": 0}, r"probe_every_n_steps must be >= 1"),
    ],
)
def test_probe_cadence_refuses_what_needs_every_step(
    options: dict[str, object], match: str
) -> None:
    model = EncoderDecoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"probe_every_n_steps": 2, **options}
    with pytest.raises(ValueError, match=match):
        gw.GradWatch(model, optimizer, **options)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- repr and notebook


def test_repr_is_one_line_without_flushing_or_syncing() -> None:
    model = EncoderDecoder()
    watch = gw.GradWatch(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        log_every_n_steps=50,
        include="encoder.*",
        remedies=[gw.ClipNorm(1.0)],
    )
    backward(model)
    watch.step()
    with count_syncs() as syncs:
        text = repr(watch)
    assert sum(syncs.values()) == 0 and watch.engine.history.num_pending == 1
    assert text == (
        "GradWatch(EncoderDecoder, 2 layers, 1 step, no alerts, log_every_n_steps=50, "
        "include=['encoder.*'], remedies=[ClipNorm])"
    )
    watch.close()
    assert repr(watch).endswith(", closed)")


def test_the_notebook_view_shows_the_gradient_flow_and_the_alerts_in_order() -> None:
    from PIL import Image

    model = EncoderDecoder()
    watch = gw.GradWatch(model, log_every_n_steps=50, detectors=[FiresOnNonFinite()])
    for step in range(8):
        backward(model, seed=step)
        if step in (2, 5):
            model.encoder[0].weight.grad[0, 0] = float("inf")
        watch.step()
        model.zero_grad()
    page = watch._repr_html_()  # flushes, like summary()
    assert watch.alerts[0].step == 2
    (source,) = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(source))).convert("RGB"))
    assert image.shape[1] > 350
    assert np.all(image == [255, 0, 255], axis=2).any()  # the Inf steps, in magenta
    assert "steps 0-7" in page and "non-finite total" in page
    cells = re.findall(r"<tr><td>(\d+)</td>", page)
    assert cells == sorted(cells, key=int) and cells[0] == "2"
    watch.close()


def test_the_notebook_view_escapes_layer_names_and_works_before_any_step() -> None:
    watch = gw.GradWatch(EncoderDecoder(), detectors=())
    page = watch._repr_html_()
    assert "no gradients recorded yet" in page and "no alerts" in page
    watch.close()


def test_the_transformers_callback_takes_the_same_controls() -> None:
    pytest.importorskip("transformers")
    from gradwatch.integrations.transformers import GradWatchCallback as TrainerCallback

    callback = TrainerCallback(include=re.compile("attn"), probe_every_n_steps=2)
    assert callback.config.include == (re.compile("attn"),)
    assert callback.config.probe_every_n_steps == 2
