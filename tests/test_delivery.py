"""Alerts that arrive in time (the mailbox and the early flush) and deduplication that never hides
a new event (the alert book)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch as gw
from gradwatch.engine.alerts import Alert, AlertBook, AlertKind
from gradwatch.engine.mailbox import Mailbox
from gradwatch.engine.observation import Detection, Observation
from tests.helpers import ONE_TRANSFER, RecordingSink, count_syncs

CADENCE = 50


class Diverging:
    """A real regression run (MLP, SGD) whose learning rate is multiplied at one step."""

    def __init__(self, lr_factor: float = 1000.0, at: int = 50, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(512, 16, generator=generator)
        self.y = self.x[:, :1] * 2 + 0.1 * torch.randn(512, 1, generator=generator)
        self.generator = generator
        self.lr_factor, self.at = lr_factor, at

    def backward(self, step: int) -> torch.Tensor:
        """The step's forward and backward pass (the LR change happens before step ``at``)."""
        if step == self.at:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_factor
        index = torch.randint(0, len(self.x), (64,), generator=self.generator)
        self.optimizer.zero_grad()
        loss = F.mse_loss(self.model(self.x[index]), self.y[index])
        loss.backward()
        return loss


def _warnings_and_errors(alerts: list[Alert]) -> list[Alert]:
    return [alert for alert in alerts if alert.severity in ("warning", "error")]


# ------------------------------------------------------------------ delivery in a real run


def test_a_planted_divergence_is_announced_within_two_steps_and_before_the_loss_turns_nan(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = Diverging()
    delivered: list[tuple[int, Alert]] = []  # (step() call that delivered it, alert)
    current = {"step": -1}
    watch = gw.GradWatch(
        run.model,
        run.optimizer,
        log_every_n_steps=CADENCE,
        on_alert=lambda alert: delivered.append((current["step"], alert)),
    )
    first_nonfinite: int | None = None
    reported: dict[int, list[Alert]] = {}
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        for step in range(100):
            current["step"] = step
            loss = run.backward(step)
            if first_nonfinite is None and not torch.isfinite(loss):
                first_nonfinite = step
            report = watch.step(loss=loss)
            reported[step] = report.alerts
            run.optimizer.step()
    watch.close()
    late = [(at, a) for at, a in delivered if a.step >= run.at and a.severity != "info"]
    assert late, f"no warning/error after the LR change: {watch.alerts}"
    at, alert = late[0]
    assert at - alert.step <= 2, (at, alert)  # within two steps of its detection (CPU: same step)
    assert first_nonfinite is None or at < first_nonfinite, (at, first_nonfinite)
    assert at < CADENCE * 2 - 1  # not at the regular flush of step 99
    assert alert in reported[at]  # StepReport.alerts of the step that delivered it
    assert any(str(alert) in record.getMessage() for record in caplog.records)  # the logger


def test_the_lr_change_of_a_tiny_bert_is_announced_at_once() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(  # BERT-tiny's shape, random init
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=512, max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (512, 32), generator=generator)
    labels = (ids[:, 0] % 2).long()  # a learnable rule: the parity of the first token
    delivered: list[tuple[int, Alert]] = []
    current = {"step": -1}
    watch = gw.GradWatch(
        model,
        optimizer,
        log_every_n_steps=CADENCE,
        on_alert=lambda alert: delivered.append((current["step"], alert)),
    )
    first_nonfinite: int | None = None
    for step in range(58):
        current["step"] = step
        if step == 50:
            for group in optimizer.param_groups:
                group["lr"] *= 1000.0
        index = torch.randint(0, len(ids), (32,), generator=generator)
        optimizer.zero_grad()
        loss = model(input_ids=ids[index], labels=labels[index]).loss
        loss.backward()
        if first_nonfinite is None and not torch.isfinite(loss):
            first_nonfinite = step
        watch.step(loss=loss)
        optimizer.step()
    watch.close()
    after = [(at, a) for at, a in delivered if a.step >= 50 and a.severity != "info"]
    assert after, f"the divergence was not announced: {watch.alerts}"
    at, alert = after[0]
    assert alert.step <= 53 and at - alert.step <= 2, (at, alert)
    assert first_nonfinite is None or at < first_nonfinite


def test_healthy_steps_read_nothing_and_only_a_new_alert_costs_one_transfer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=1000, check_activations=True)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    reads: list[dict[str, int]] = []
    for step in range(40):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y) * (float("nan") if step >= 30 else 1.0)
        loss.backward()
        with count_syncs() as counts:
            report = watch.step(loss=loss)
        reads.append(dict(counts))
        assert bool(report.alerts) == (step == 30), (step, report.alerts)
        if step < 30:
            optimizer.step()
    assert all(r == {} for r in reads[:30]), reads[:30]
    assert reads[30] == ONE_TRANSFER  # the NaN: delivered at once
    assert all(r == {} for r in reads[31:]), reads[31:]  # it continues: no further flush
    (alert,) = watch.alerts
    assert alert.kind is AlertKind.NONFINITE and alert.step == 30
    watch.close()


# ------------------------------------------------------------------ records, history, sinks


class FiresAtSteps(gw.Detector):
    """Test detector: fires at the given steps with the given value, blaming layer ``"0"``."""

    kind = AlertKind.SPIKE

    def __init__(self, values: dict[int, float], cadence: str = "step") -> None:
        super().__init__(threshold=3.0)
        self.values = values
        self.cadence = cadence  # type: ignore[misc]

    def observe(self, obs: Observation) -> Detection:
        fired = torch.tensor([s in self.values for s in obs.steps])
        value = torch.tensor([self.values.get(s, 0.0) for s in obs.steps])
        scores = torch.zeros(len(obs.steps), len(self.candidate_names()))
        scores[:, 0] = fired.float()
        return Detection(fired=fired, value=value, scores=scores)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return f"test spike {value:g}"


def _train(watch: gw.GradWatch, model: nn.Module, steps: int) -> list[gw.StepReport]:
    torch.manual_seed(1)
    reports = []
    for _ in range(steps):
        model.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        reports.append(watch.step())
    return reports


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def test_an_early_flush_hands_the_alert_at_once_and_its_steps_with_the_next_regular_record() -> (
    None
):
    model, sink = _mlp(), RecordingSink()
    watch = gw.GradWatch(
        model, log_every_n_steps=10, detectors=[FiresAtSteps({13: 5.0})], sinks=[sink]
    )
    reports = _train(watch, model, 25)
    assert [len(r.alerts) for r in reports].index(1) == 13
    steps_per_record = [record.steps.tolist() for record in sink.records]
    assert steps_per_record == [list(range(10)), [], list(range(10, 20))]
    early = sink.records[1]
    assert [a.step for a in early.new_alerts] == [13] and early.last_step == 13
    assert early.alert_counts == {"spike": 1}
    assert sink.records[2].new_alerts == []
    watch.close()
    assert sink.records[-1].steps.tolist() == list(range(20, 25))
    assert watch.history()["step"].tolist() == list(range(25))


def test_tensorboard_shows_the_alert_at_its_step_and_keeps_the_scalar_cadence(
    tmp_path: Path,
) -> None:
    model = _mlp()
    detector = FiresAtSteps({23: 5.0})
    watch = gw.GradWatch(model, logdir=tmp_path, log_every_n_steps=10, detectors=[detector])
    reports = _train(watch, model, 35)
    assert [a.step for a in reports[23].alerts] == [23]
    watch.close()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    (text,) = accumulator.Tensors("gradwatch/alerts")
    assert text.step == 23 and "test spike 5" in text.tensor_proto.string_val[0].decode()
    per_layer = [e.step for e in accumulator.Scalars("gradwatch/grad_norm/0")]
    assert per_layer == [9, 19, 29, 34]  # the cadence (and the last flush), not step 23
    totals = [e.step for e in accumulator.Scalars("gradwatch/grad_norm_total")]
    assert totals == list(range(35))  # every step once
    counts = [(e.step, e.value) for e in accumulator.Scalars("gradwatch/alerts/spike")]
    assert counts == [(22, 0.0), (23, 1.0), (29, 1.0), (34, 1.0)]
    history = watch.history()
    window = history["0"][20:30]
    (max_event,) = [e for e in accumulator.Scalars("gradwatch/grad_norm_max/0") if e.step == 29]
    assert max_event.value == pytest.approx(float(np.max(window)), rel=1e-6)  # 20-29, whole


def test_a_flush_cadence_detection_that_returns_after_clearing_is_a_second_alert() -> None:
    model = _mlp()
    detector = FiresAtSteps({3: 5.0, 4: 5.0, 5: 6.0, 30: 5.0}, cadence="flush")
    watch = gw.GradWatch(model, log_every_n_steps=40, detectors=[detector])
    reports = _train(watch, model, 40)
    assert [a.step for a in reports[39].alerts] == [3, 30]  # one window, two episodes
    (_, last, count, peak), _ = watch.engine.book.episodes()
    assert (last, count, peak) == (5, 3, 6.0)
    assert "from step 3 to 5 (3 detections)" in watch.summary()
    watch.close()


# ------------------------------------------------------------------ Lightning


def test_lightning_an_early_alert_reaches_the_loggers_before_the_flush(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from gradwatch.lightning import GradWatchCallback

    class NaNAt(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            return loss * float("nan") if self.global_step == 20 else loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    logger = CSVLogger(tmp_path, name="csv")
    seen: list[tuple[int, bool]] = []
    fitting: dict[str, Any] = {}

    def on_alert(alert: Alert) -> None:  # the sinks were written before on_alert is called
        path = Path(logger.log_dir) / "gradwatch_alerts.md"
        logged = path.exists() and alert.message in path.read_text()
        seen.append((fitting["trainer"].global_step, logged))

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=30,
        log_every_n_steps=50,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GradWatchCallback(on_alert=on_alert)],
    )
    fitting["trainer"] = trainer
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    trainer.fit(NaNAt(), DataLoader(TensorDataset(x, x[:, :1]), batch_size=8))
    assert seen and seen[0] == (20, True), seen  # at the step of the NaN, text already logged
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    tag = "gradwatch/alerts/nonfinite"
    counts = {int(r["step"]): float(r[tag]) for r in rows if r.get(tag)}
    assert counts[19] == 0.0 and counts[20] == 1.0  # the count steps up at step 20


# ------------------------------------------------------------------ the alert book


def _spike(step: int, value: float = 5.0, layers: tuple[str, ...] = ("fc",)) -> Alert:
    return Alert(AlertKind.SPIKE, step, layers, value, 3.0, "warning", "spike")


def _feed(book: AlertBook, detections: list[Alert]) -> list[int]:
    """Records each detection; the steps of the ones that were new alerts."""
    return [d.step for d in detections if book.record(d) is not None]


def test_book_a_steady_condition_is_one_alert_with_its_count() -> None:
    book = AlertBook(clear_after=10)
    assert _feed(book, [_spike(s, 4.0 + (s % 3)) for s in range(20, 60, 3)]) == [20]
    ((alert, last, count, peak),) = book.episodes()
    assert (alert.step, last, count, peak) == (20, 59, 14, 6.0)


def test_book_a_condition_that_cleared_and_returns_is_a_new_alert() -> None:
    book = AlertBook(clear_after=10)
    assert _feed(book, [_spike(25), _spike(26), _spike(51), _spike(61), _spike(72)]) == [25, 51, 72]
    assert book.counts() == {AlertKind.SPIKE: 3}


def test_book_an_escalation_by_ten_is_a_new_alert_even_inside_an_episode() -> None:
    book = AlertBook(clear_after=10)
    values = [5.0, 8.0, 80.0, 100.0, 1000.0]  # against the peak since the latest alert (8, 100)
    assert _feed(book, [_spike(10 + i, v) for i, v in enumerate(values)]) == [10, 12, 14]


def test_book_a_ratio_ten_times_smaller_escalates_a_below_threshold_kind() -> None:
    book = AlertBook(clear_after=10)

    def vanishing(step: int, ratio: float) -> Alert:
        return Alert(AlertKind.VANISHING, step, ("0",), ratio, 1e-2, "warning", "vanishing")

    found = _feed(book, [vanishing(5, 5e-3), vanishing(6, 2e-3), vanishing(7, 1e-4)])
    assert found == [5, 7]  # 1e-4 <= 2e-3 / 10


def test_book_counts_and_fractions_never_escalate() -> None:
    book = AlertBook(clear_after=10)
    nan = [
        Alert(AlertKind.NONFINITE, s, ("2",), n, 0.0, "error", "nan") for s, n in [(5, 1), (6, 12)]
    ]
    assert _feed(book, nan) == [5]  # the NaN spreading to 12 layers is the same event


def test_book_a_condition_in_other_layers_is_a_new_alert_overlapping_ones_continue() -> None:
    book = AlertBook(clear_after=10)
    detections = [_spike(5, layers=("a",)), _spike(6, layers=("a", "b")), _spike(7, layers=("b",))]
    detections += [_spike(8, layers=("c",)), _spike(9, layers=()), _spike(10, layers=("a",))]
    assert _feed(book, detections) == [5, 8]


def test_book_state_is_plain_and_restores_spans_and_open_episodes() -> None:
    book = AlertBook(clear_after=10)
    _feed(book, [_spike(5), _spike(6, 7.0), _spike(40)])
    state = json.loads(json.dumps(book.state_dict()))  # plain values only
    restored = AlertBook(clear_after=10)
    restored.load_state_dict(state)
    assert restored.episodes() == book.episodes()
    assert restored.continues(AlertKind.SPIKE, 45, 5.0, ("fc",))
    assert not restored.continues(AlertKind.SPIKE, 55, 5.0, ("fc",))


def test_book_loads_the_older_state_format() -> None:
    alert = _spike(5)
    from gradwatch.engine.alerts import alert_to_dict

    old = {
        "alerts": [alert_to_dict(alert)],
        "open": {"spike": {"index": 0, "last_step": 9, "count": 4, "peak": 7.0}},
    }
    book = AlertBook(clear_after=10)
    book.load_state_dict(old)
    assert book.episodes() == [(alert, 9, 4, 7.0)]
    assert book.continues(AlertKind.SPIKE, 19, 5.0, ("fc",))


# ------------------------------------------------------------------ the mailbox


def test_mailbox_on_the_cpu_delivers_in_the_same_step_in_order() -> None:
    box = Mailbox(torch.device("cpu"))
    box.post(3, torch.tensor([True, False]))
    box.post(4, torch.tensor([0.5, 2.0]))
    rows = box.collect()
    assert [(s, r.tolist()) for s, r in rows] == [(3, [1.0, 0.0]), (4, [0.5, 2.0])]
    assert box.collect() == []
    box.post(5, torch.arange(3.0))  # another size (a new layout)
    assert [(s, r.tolist()) for s, r in box.collect()] == [(5, [0.0, 1.0, 2.0])]
    assert not Mailbox.supports(torch.device("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mailbox_on_cuda_never_waits_and_delivers_once_the_copy_landed() -> None:
    box = Mailbox(torch.device("cuda"), depth=2)
    for step in range(5):
        box.post(step, torch.full((4,), float(step), device="cuda"))
    torch.cuda.synchronize()
    rows = box.collect()  # the oldest were waited for when the queue was full: none is lost
    assert [s for s, _ in rows] == list(range(5))
    assert all((r == s).all() for s, r in rows)
