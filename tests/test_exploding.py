"""Exploding and spike on real architectures: quiet on healthy recipes, in time on divergence.

Models are library definitions with random init (transformers tiny configs, no downloads) and
small real or synthetic data; every run uses the default detectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.learning_rates import LearningRates, update_rule
from tests import zoo
from tests.helpers import count_syncs

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

Batch = Callable[[], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def _bert(seed: int) -> tuple[nn.Module, Batch, LossFn]:
    """BERT-tiny sequence classification on a synthetic token task (label: a sum of tokens)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 200, (512, 12), generator=generator)
    labels = tokens[:, :4].sum(1) % 2

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, 512, (16,), generator=generator)
        return tokens[index], labels[index]

    def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=data[0], labels=data[1]).loss

    return model, batch, loss_fn


class _LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embedding(tokens))[0])


def _lstm(seed: int) -> tuple[nn.Module, Batch, LossFn]:
    """An LSTM language model on sequences whose odd tokens follow from the even ones."""
    torch.manual_seed(seed)
    model = _LSTMLanguageModel()
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 64, (256, 25), generator=generator)
    text[:, 1::2] = (text[:, 0::2][:, :12] * 7 + 3) % 64

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, 256, (16,), generator=generator)
        return text[index, :-1], text[index, 1:]

    def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(data[0]).reshape(-1, 64), data[1].reshape(-1))

    return model, batch, loss_fn


def _digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits as 3-channel images of ``size`` pixels."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = nn.functional.interpolate(images, size=size).expand(-1, 3, -1, -1).contiguous()
    return images, torch.tensor(digits.target)


def _resnet(seed: int) -> tuple[nn.Module, Batch, LossFn]:
    """A transformers ResNet (basic blocks, tiny widths) on digits."""
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic"
    )
    config.num_labels = 10
    model = transformers.ResNetForImageClassification(config)
    images, labels = _digits()
    generator = torch.Generator().manual_seed(seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(images), (16,), generator=generator)
        return images[index], labels[index]

    def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(pixel_values=data[0]).logits, data[1])

    return model, batch, loss_fn


def _run(
    built: tuple[nn.Module, Batch, LossFn],
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    lr_factor_at: tuple[int, float] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[gw.GradWatch, int | None]:
    """Trains with the default detectors; returns the watch and the first non-finite loss step."""
    model, batch, loss_fn = built
    watch = gw.GradWatch(
        model, optimizer, scaler=scaler, log_every_n_steps=10, on_alert=lambda alert: None
    )
    first_nan = None
    for step in range(steps):
        if lr_factor_at is not None and step == lr_factor_at[0]:
            for group in optimizer.param_groups:
                group["lr"] *= lr_factor_at[1]
        optimizer.zero_grad()
        loss = loss_fn(model, batch())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        watch.step(loss=loss)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if first_nan is None and not math.isfinite(float(loss.detach())):
            first_nan = step
    watch.close()
    return watch, first_nan


def _loud(watch: gw.GradWatch) -> list[str]:
    return [str(alert) for alert in watch.alerts if alert.severity in ("warning", "error")]


# ------------------------------------------------------------------------- healthy recipes


@pytest.mark.parametrize("seed", [0, 1])
def test_bert_tiny_with_adamw_stays_quiet_for_200_steps(seed: int) -> None:
    built = _bert(seed)
    watch, _ = _run(built, torch.optim.AdamW(built[0].parameters(), lr=1e-3), 200)
    assert _loud(watch) == []


def test_lstm_language_model_with_adam_stays_quiet_for_200_steps() -> None:
    built = _lstm(0)
    watch, _ = _run(built, torch.optim.Adam(built[0].parameters(), lr=1e-3), 200)
    assert _loud(watch) == []


def test_resnet_with_only_its_head_in_the_optimizer_judges_only_the_head() -> None:
    built = _resnet(0)
    model = built[0]
    optimizer = torch.optim.SGD(model.classifier.parameters(), lr=0.1, momentum=0.9)
    watch, _ = _run(built, optimizer, 40)
    assert _loud(watch) == []
    # The same model with everything in an optimizer that overshoots is judged everywhere.
    loud = torch.optim.Adam(model.parameters(), lr=10.0)
    watch, _ = _run(built, loud, 2)
    exploding = [a for a in watch.alerts if a.kind is gw.AlertKind.EXPLODING]
    assert exploding and exploding[0].step == 0
    assert any(name.startswith("resnet.") for name in exploding[0].layers)


def test_mlp_on_large_targets_under_fp16_grad_scaler_stays_quiet() -> None:
    """Gradients 70x the weights (targets of scale 100) are not an explosion under Adam."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=generator)
    y = 100 * torch.sin(x @ torch.randn(16, 1, generator=generator))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, 512, (32,), generator=generator)
        return x[index], y[index]

    def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.mse_loss(model(data[0]).float(), data[1])

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch, _ = _run((model, batch, loss_fn), optimizer, 100, scaler=torch.amp.GradScaler("cpu"))
    assert _loud(watch) == []


# ------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("factor", [100.0, 1000.0])
def test_bert_tiny_learning_rate_jump_is_announced_at_once(factor: float) -> None:
    built = _bert(0)
    optimizer = torch.optim.AdamW(built[0].parameters(), lr=1e-3)
    watch, first_nan = _run(built, optimizer, 60, lr_factor_at=(50, factor))
    loud = [a for a in watch.alerts if a.severity in ("warning", "error")]
    assert loud and loud[0].kind is gw.AlertKind.EXPLODING, _loud(watch)
    assert loud[0].step in (50, 51) and (first_nan is None or loud[0].step < first_nan)
    assert "learning rate" in loud[0].message


@pytest.mark.parametrize("make_optimizer", ["adam", "sgd"])
def test_lstm_learning_rate_x100_is_announced_at_once(make_optimizer: str) -> None:
    built = _lstm(0)
    params = built[0].parameters()
    optimizer = (
        torch.optim.Adam(params, lr=1e-3)
        if make_optimizer == "adam"
        else torch.optim.SGD(params, lr=1.0)
    )
    watch, first_nan = _run(built, optimizer, 60, lr_factor_at=(50, 100.0))
    loud = [a for a in watch.alerts if a.severity in ("warning", "error")]
    assert loud, "no alert after the learning rate jumped x100"
    assert loud[0].step in (50, 51) and (first_nan is None or loud[0].step < first_nan)
    assert loud[0].kind in (gw.AlertKind.EXPLODING, gw.AlertKind.SPIKE)


@pytest.mark.parametrize("lr", [0.01, 0.1])
def test_gain_3_elman_rnn_fires_at_step_0_with_sgd(lr: float) -> None:
    model = zoo.exploding_rnn(radius=3.0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 30, 8, generator=generator)
    y = x[:, :, 0].mean(1, keepdim=True)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return x[:32], y[:32]

    def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(model(data[0]), data[1])

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    watch, _ = _run((model, batch, loss_fn), optimizer, 3)
    exploding = [a for a in watch.alerts if a.kind is gw.AlertKind.EXPLODING]
    assert exploding and exploding[0].step in (0, 1) and exploding[0].layers[0] == "rnn"


# ------------------------------------------------------------------------- learning rates


def test_learning_rates_follow_groups_changes_and_membership() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(
        [
            {"params": [model[0].weight], "lr": 0.1},
            {"params": [model[0].bias], "lr": 0.3},
            {"params": model[1].parameters()},
        ],
        lr=0.01,
    )
    watch = gw.GradWatch(model, optimizer, detectors=[])
    rates = LearningRates(optimizer, watch.engine.layout)
    first = rates.read()
    assert first.tolist() == pytest.approx([math.sqrt((16 * 0.01 + 4 * 0.09) / 20), 0.01, 0.0])
    assert rates.read() is first  # unchanged: not rebuilt
    optimizer.param_groups[2]["lr"] = 0.5
    assert rates.read().tolist()[1] == pytest.approx(0.5)
    watch.close()
    assert update_rule(torch.optim.AdamW(model.parameters())) == "adaptive"
    assert update_rule(optimizer) == "sgd"
    assert update_rule(torch.optim.LBFGS(model.parameters())) is None


def test_tensor_learning_rates_are_read_without_a_host_sync_and_follow_in_place_changes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    lr = torch.tensor(1e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=1000, on_alert=lambda alert: None)
    x = torch.randn(32, 8)
    model(x).pow(2).mean().backward()
    watch.step()  # the first step measures the weights (and reads the layout) once
    rates = LearningRates(optimizer, watch.engine.layout)
    with count_syncs() as syncs:
        for _ in range(1, 4):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            watch.step()
        before = rates.read()
        optimizer.param_groups[0]["lr"].fill_(10.0)  # in place: a new version, read on the device
        after = rates.read()
    assert sum(syncs.values()) == 0, syncs
    assert after is not before and after.tolist() == pytest.approx([10.0, 10.0])
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    watch.step()  # step 4: the update would overshoot
    watch.flush()
    exploding = [a for a in watch.alerts if a.kind is gw.AlertKind.EXPLODING]
    watch.close()
    assert [a.step for a in exploding] == [4]
