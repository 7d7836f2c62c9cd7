"""watch.summary(): worst layers with their norms, alerts with advice, or "No problems found."."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

import gradwatch as gw
from gradwatch.demo import run_scenario
from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.observation import Detection, Observation
from tests import zoo


class AlwaysFires(gw.Detector):
    """Test-only detector: fires at every step, naming the first two layers (first one first)."""

    severity = "warning"
    threshold = 1.0

    def __init__(self, kind: AlertKind) -> None:
        super().__init__(threshold=1.0)
        self.kind = kind  # type: ignore[misc]

    def observe(self, obs: Observation) -> Detection:
        scores = torch.zeros_like(obs.norms)
        scores[:, :2] = torch.tensor([2.0, 1.0])
        return Detection(fired=torch.ones(1, dtype=torch.bool), value=obs.totals, scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return f"forced {self.kind.value} alert"


def train(watch: gw.GradWatch, model: nn.Module, steps: int) -> None:
    x, y = zoo.regression_data(n=32, d_in=16)
    for _ in range(steps):
        model.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        watch.step()


def test_summary_of_a_healthy_run_lists_norms_and_finds_no_problem() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    watch = gw.GradWatch(model, log_every_n_steps=2, detectors=())
    train(watch, model, steps=5)
    text = watch.summary()
    norms = watch.last_norms()
    smallest = min(norms, key=norms.__getitem__)
    largest = max(norms, key=norms.__getitem__)
    lines = text.splitlines()
    assert lines[0] == "gradwatch summary: 5 steps, 3 layers"
    assert "gradient norms at step 4 (window: steps 0-4)" in lines[1]
    assert lines[2].startswith(f"  smallest: {smallest} {norms[smallest]:.3g}")
    assert lines[3].startswith(f"  largest:  {largest} {norms[largest]:.3g}")
    ratio = norms["0"] / norms["4"]
    assert lines[4] == f"  first/last layer norm ratio: {ratio:.3g} (0 vs 4)"
    assert "alerts" not in text
    assert lines[-1] == "No problems found."
    watch.close()


def test_summary_with_zero_steps() -> None:
    watch = gw.GradWatch(zoo.deep_mlp(nn.ReLU, depth=3))
    text = watch.summary()
    assert text.splitlines() == [
        "gradwatch summary: 0 steps, 3 layers",
        "  no gradients recorded yet",
        "No problems found.",
    ]
    watch.close()


def test_summary_shows_a_forced_alert_with_its_episode_layers_and_advice() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.Sigmoid, depth=4)
    detectors = [AlwaysFires(AlertKind.VANISHING), AlwaysFires(AlertKind.SATURATION)]
    watch = gw.GradWatch(model, log_every_n_steps=5, detectors=detectors)
    train(watch, model, steps=12)
    text = watch.summary()
    assert "alerts (2):" in text
    assert (
        "  [warning] vanishing from step 0 to 11 (12 detections) in 0, 2: forced vanishing alert"
        in text
    )
    assert "  [warning] saturation from step 0 to 11 (12 detections) in 0, 2:" in text
    advice = text.split("advice:\n", 1)[1].splitlines()
    # Both kinds advise replacing Sigmoid: listed once.
    assert advice.count("  - replace Sigmoid with ReLU/GELU") == 1
    assert "  - add BatchNorm/LayerNorm" in advice
    assert "No problems found." not in text
    watch.close()


def test_summary_names_layers_with_non_finite_gradients() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    watch = gw.GradWatch(model, log_every_n_steps=1, detectors=())
    x, y = zoo.regression_data(n=8, d_in=16)
    (model(x) - y).pow(2).mean().backward()
    model[2].weight.grad[0, 0] = float("nan")
    watch.step()
    text = watch.summary()
    assert "  non-finite: 2" in text
    assert "smallest: 2" not in text and "largest:  2" not in text
    watch.close()


def test_root_layer_is_shown_as_root() -> None:
    model = nn.Linear(4, 1)
    watch = gw.GradWatch(model, log_every_n_steps=1, detectors=())
    model(torch.randn(3, 4)).sum().backward()
    watch.step()
    assert "smallest: <root>" in watch.summary()
    watch.close()


def test_watch_alert_advice_leaves_out_the_remedies_in_use() -> None:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(
        model,
        optimizer,
        log_every_n_steps=1,
        detectors=[AlwaysFires(AlertKind.SPIKE)],
        remedies=[gw.ZClip()],
    )
    train(watch, model, steps=1)
    (alert,) = watch.alerts
    assert alert.advice == ("lower the learning rate (now 0.1 for SGD)", "enable gw.LRBackoff")
    watch.close()


class FiresFrom(AlwaysFires):
    """Test-only detector: fires from step ``start`` on."""

    def __init__(self, kind: AlertKind, start: int) -> None:
        super().__init__(kind)
        self.start = start

    def observe(self, obs: Observation) -> Detection:
        detection = super().observe(obs)
        fired = torch.tensor([step >= self.start for step in obs.steps])
        return Detection(fired=fired, value=detection.value, scores=detection.scores)


def _watch_with(detectors: list[gw.Detector]) -> tuple[gw.GradWatch, nn.Module]:
    torch.manual_seed(0)
    model = zoo.deep_mlp(nn.ReLU, depth=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return gw.GradWatch(model, optimizer, log_every_n_steps=5, detectors=detectors), model


def test_summary_tells_an_explosion_and_its_aftermath_as_one_story() -> None:
    watch, model = _watch_with(
        [FiresFrom(AlertKind.EXPLODING, 0), FiresFrom(AlertKind.STAGNATION, 7)]
    )
    train(watch, model, steps=12)
    exploding, stagnation = watch.alerts
    assert exploding.kind is AlertKind.EXPLODING
    assert stagnation.advice[0] == (
        "first fix the exploding alert of step 0 (its advice): stagnation after a divergence is "
        "usually its consequence"
    )
    text = watch.summary()
    assert (
        "story: exploding at step 0 came first; the stagnation (from step 7) that followed is "
        "likely its consequence: fix the exploding first"
    ) in text
    advice = text.split("advice:\n", 1)[1].splitlines()
    assert advice[0] == "  - lower the learning rate (now 0.1 for SGD)"
    assert not any("raise the learning rate" in line or "first fix" in line for line in advice)
    watch.close()


def test_summary_without_a_divergence_tells_no_story_and_may_raise_the_learning_rate() -> None:
    watch, model = _watch_with([FiresFrom(AlertKind.STAGNATION, 2)])
    train(watch, model, steps=6)
    text = watch.summary()
    assert "story:" not in text
    assert "  - raise the learning rate (now 0.1 for SGD) or check its schedule" in text
    watch.close()


def test_the_exploding_rnn_demo_summary_does_not_contradict_itself(tmp_path: Path) -> None:
    result = run_scenario("exploding", tmp_path, out=io.StringIO())
    kinds = [alert.kind for alert in result.alerts]
    assert kinds[0] is AlertKind.EXPLODING
    advice = result.diagnosis.split("advice:\n", 1)[1].splitlines()
    assert any("lower the learning rate" in line for line in advice)
    assert not any("raise the learning rate" in line for line in advice)
    for alert in result.alerts[1:]:
        if alert.kind in (AlertKind.VANISHING, AlertKind.STAGNATION, AlertKind.SATURATION):
            assert alert.advice[0].startswith("first fix the exploding alert of step")
            assert "story: exploding at step" in result.diagnosis
