"""Test helpers: float64 reference norms, a host-sync spy, a scripted detector, a NaN injector."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.detectors import Detector
from gradwatch.engine.observation import Detection, Observation
from gradwatch.engine.records import FlushRecord
from gradwatch.sinks.base import Sink

SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
ONE_TRANSFER = {"cpu": 1, "numpy": 1}
"""What a flush reads: one packed tensor. A step that delivers a new warning/error alert flushes
early (out of cadence), so it costs exactly this; healthy steps read nothing."""


class NaNInBackward(torch.autograd.Function):
    """Identity forward; its backward returns NaN (a NaN that only the backward pass makes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.full_like(grad, float("nan"))


def reference_norms(model: nn.Module, names: list[str]) -> dict[str, float]:
    """Per-layer L2 gradient norms in float64, straight from the definition (tied params once)."""
    seen: set[int] = set()
    out: dict[str, float] = {}
    modules = dict(model.named_modules())
    owner: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                owner.setdefault(name, []).append(p)
    for name in names:
        assert name in modules
        sq = sum(
            (
                p.grad.double().pow(2).sum()
                if p.grad is not None
                else torch.zeros((), dtype=torch.float64)
            )
            for p in owner[name]
        )
        out[name] = float(torch.as_tensor(sq).sqrt())
    return out


@contextlib.contextmanager
def count_syncs() -> Iterator[Counter]:
    """Counts calls of tensor methods that move data to the host, while active."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def spy(name: str, original):  # type: ignore[no-untyped-def]
        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class RecordingSink(Sink):
    """A sink that keeps every flush record (tests read them back)."""

    def __init__(self) -> None:
        self.records: list[FlushRecord] = []
        self.closed = False

    def write(self, record: FlushRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


class FiresAt(Detector):
    """Test detector: fires its kind at the chosen steps, nowhere else."""

    def __init__(self, kind: AlertKind, steps: Iterable[int]) -> None:
        super().__init__()
        self.kind = kind  # type: ignore[misc]
        self.steps = set(steps)

    def observe(self, obs: Observation) -> Detection:
        device = self.layout.device
        fired = torch.tensor(obs.steps[0] in self.steps, device=device)
        return Detection(fired=fired, value=torch.zeros((), device=device))

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return "test detection"
