"""Gradient histograms: binned on the device, decoded into valid ``add_histogram_raw`` arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.engine.histograms import MAX_MAGNITUDE, MIN_MAGNITUDE, NUM_BINS, bucket_limits
from gradwatch.engine.records import FlushRecord
from gradwatch.sinks.base import Sink
from tests.helpers import count_syncs


class CaptureSink(Sink):
    """Keeps every flush record."""

    def __init__(self) -> None:
        self.records: list[FlushRecord] = []

    def write(self, record: FlushRecord) -> None:
        self.records.append(record)


def _histograms_for(model: nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Sets the given gradients, runs one watched step with histograms on, returns them by layer."""
    sink = CaptureSink()
    watch = gw.GradWatch(
        model, log_every_n_steps=1, histogram_every_n_steps=1, detectors=(), sinks=[sink]
    )
    for name, param in model.named_parameters():
        param.grad = grads[name].clone() if name in grads else None
    watch.step()
    watch.close()
    return {name: hist for _, name, hist in sink.records[0].histograms}


def _bucket_index(limits: list[float], value: float) -> int:
    """Index of the bucket ``(limits[i - 1], limits[i]]`` holding ``value``."""
    return int(np.searchsorted(np.asarray(limits), value, side="left"))


def test_bucket_limits_are_signed_log_spaced_and_increasing() -> None:
    limits = bucket_limits()
    assert len(limits) == NUM_BINS
    assert np.all(np.diff(limits) > 0)
    centre = NUM_BINS // 2
    assert limits[centre] == MIN_MAGNITUDE and limits[centre - 1] == -MIN_MAGNITUDE
    assert limits[-1] == np.inf and limits[-2] < MAX_MAGNITUDE


def test_values_land_in_the_bucket_that_contains_them() -> None:
    model = nn.Linear(4, 2)
    values = torch.tensor([[3e-3, -5e-2, 0.0, 7.0], [2e7, -1e-15, 0.4, -3.3e-6]])
    hists = _histograms_for(model, {"weight": values, "bias": torch.tensor([1.7e-9, -0.02])})
    hist = hists[""]
    everything = torch.cat([values.reshape(-1), torch.tensor([1.7e-9, -0.02])]).double()
    assert hist["num"] == 10
    assert sum(hist["bucket_counts"]) == 10
    assert hist["min"] == pytest.approx(-5e-2)
    assert hist["max"] == pytest.approx(2e7)
    assert hist["sum"] == pytest.approx(float(everything.sum()), rel=1e-5)
    assert hist["sum_squares"] == pytest.approx(float(everything.pow(2).sum()), rel=1e-5)
    limits = hist["bucket_limits"]
    assert len(limits) == len(hist["bucket_counts"])
    assert limits == sorted(limits)
    expected = np.zeros(len(limits))
    for value in everything.tolist():
        expected[_bucket_index(limits, value)] += 1
    assert hist["bucket_counts"] == expected.tolist()
    assert limits[-1] == pytest.approx(2e7)  # the overflow bucket ends at the maximum


def test_random_gradients_match_a_numpy_reference_per_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    grads = {
        name: torch.randn_like(p) * 10 ** torch.empty_like(p).uniform_(-6, 1)
        for name, p in model.named_parameters()
    }
    hists = _histograms_for(model, grads)
    assert list(hists) == ["0", "2"]
    for layer in ("0", "2"):
        values = torch.cat([grads[f"{layer}.weight"].reshape(-1), grads[f"{layer}.bias"]]).double()
        hist = hists[layer]
        assert hist["num"] == values.numel()
        assert hist["min"] == pytest.approx(float(values.min()), rel=1e-6)
        assert hist["max"] == pytest.approx(float(values.max()), rel=1e-6)
        assert hist["sum_squares"] == pytest.approx(float(values.pow(2).sum()), rel=1e-5)
        reference = np.zeros(len(hist["bucket_limits"]))
        for value in values.tolist():
            reference[_bucket_index(hist["bucket_limits"], value)] += 1
        mismatched = np.abs(reference - np.asarray(hist["bucket_counts"])).sum()
        assert mismatched <= 2  # only float32 rounding at a bucket edge may move a value


def test_nan_values_are_left_out_and_the_statistics_stay_finite() -> None:
    model = nn.Linear(3, 1, bias=False)
    hists = _histograms_for(model, {"weight": torch.tensor([[1.0, float("nan"), -2.0]])})
    hist = hists[""]
    assert hist["num"] == 2
    assert sum(hist["bucket_counts"]) == 2
    assert all(math.isfinite(hist[key]) for key in ("min", "max", "sum", "sum_squares"))


def test_layers_without_gradient_are_left_out() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    hists = _histograms_for(model, {"1.weight": torch.ones(1, 2), "1.bias": torch.ones(1)})
    assert list(hists) == ["1"]


def test_histogram_steps_follow_the_cadence_and_never_sync_the_host() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    sink = CaptureSink()
    watch = gw.GradWatch(
        model, log_every_n_steps=10, histogram_every_n_steps=3, detectors=(), sinks=[sink]
    )
    x = torch.randn(16, 8)
    syncs = []
    for _ in range(10):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        with count_syncs() as counts:
            watch.step()
        syncs.append(sum(counts.values()))
    watch.close()
    assert syncs[:9] == [0] * 9  # steps 0-8 (histograms at 0, 3, 6) do not touch the host
    steps = sorted({step for record in sink.records for step, _, _ in record.histograms})
    assert steps == [0, 3, 6, 9]
