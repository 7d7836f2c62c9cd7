"""Paired-measurement harness shared by the benchmarks.

Every variant (bare step, floor, gradwatch configurations, the baselines) trains its own copy of
the same workload, built from the same seed, in ONE process. The variants take turns step by step
(in a new random order every round, so that no variant always runs right after the same neighbour
and absorbs its background work, such as a TensorBoard writer thread drawing an image), each
step is timed with ``time.perf_counter`` (on CUDA between two ``torch.cuda.synchronize()``), and
each variant's step time is divided by the bare step's time *of the same round*. Background load
on a shared machine therefore hits numerator and denominator alike, and the median of the per-round
ratios is what the tables report, with its interquartile range.

Definitions used by every table:

* ``overhead %``: median over rounds of ``(t_variant / t_bare - 1) * 100``.
* ``IQR``: 25th-75th percentile of the same per-round values.
* ``pp over floor``: median over rounds of ``(t_variant - t_floor) / t_bare * 100``, i.e. how many
  percentage points of the bare step the variant costs beyond one ``torch._foreach_norm`` read of
  the gradients.
* ``amortised %``: per block of :data:`BLOCK_ROUNDS` consecutive rounds, ``sum(t_variant) /
  sum(t_bare) - 1``; median over blocks. Periodic work (gradwatch's flush every 50 steps, the
  hand-written ``add_histogram`` every 100 steps) lands in every block exactly as often as in
  training, whereas a per-step median never sees it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

DEFAULT_THREADS = 2  # DESIGN.md's reference setting
# A multiple of gradwatch's flush cadence (50) and of the hand-written histogram cadence (100).
BLOCK_ROUNDS = 100
HANDWRITTEN_HISTOGRAM_EVERY = 100
LIGHTNING_LOG_EVERY = 50  # Lightning's default Trainer(log_every_n_steps=50)


# --------------------------------------------------------------------------------------- workloads


@dataclass
class Trainee:
    """One trainable copy of a workload: model, optimizer and a few fixed synthetic batches.

    Attributes:
        model: The model, on its device.
        optimizer: Its optimizer.
        batches: ``(inputs, targets)`` pairs, cycled step after step.
        criterion: ``criterion(outputs, targets) -> loss``.
        device: Where everything lives.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    steps_done: int = 0

    def forward_backward(self) -> torch.Tensor:
        """Runs forward and backward on the next batch; returns the (detached) loss."""
        inputs, targets = self.batches[self.steps_done % len(self.batches)]
        loss = self.criterion(self.model(inputs), targets)
        loss.backward()
        return loss.detach()

    def finish(self, skip: bool) -> None:
        """Optimizer step (unless ``skip``) and ``zero_grad(set_to_none=True)``."""
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1


@dataclass(frozen=True)
class Workload:
    """A named training setup that can be instantiated several times identically.

    Attributes:
        name: Short name used in tables.
        description: What the model is, in a few words.
        build_model: Returns a freshly initialised model (the caller seeds the RNG).
        input_shape: Shape of one batch of inputs.
        num_classes: Classes of the cross-entropy target; 0 means a regression (MSE) target shaped
            like the output.
        output_dim: Output width for regression targets.
        lr: AdamW learning rate.
    """

    name: str
    description: str
    build_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int = 0
    output_dim: int = 0
    lr: float = 1e-4

    def instantiate(
        self,
        device: torch.device,
        seed: int = 0,
        num_batches: int = 4,
        *,
        fused: bool = False,
        tensor_lr: bool = False,
    ) -> Trainee:
        """Builds one trainable copy; every call with the same seed gives identical weights.

        ``fused`` builds ``AdamW(fused=True)``; ``tensor_lr`` passes the learning rate as a tensor
        (float32, as CUDA's fused kernels read it).
        """
        torch.manual_seed(seed)
        model = self.build_model().to(device)
        lr: Any = torch.tensor(self.lr, device=device) if tensor_lr else self.lr
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused or None)
        generator = torch.Generator().manual_seed(seed + 1)
        batches = []
        for _ in range(num_batches):
            inputs = torch.randn(self.input_shape, generator=generator)
            if self.num_classes:
                targets = torch.randint(
                    0, self.num_classes, (self.input_shape[0],), generator=generator
                )
            else:
                targets = torch.randn((self.input_shape[0], self.output_dim), generator=generator)
            batches.append((inputs.to(device), targets.to(device)))
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            nn.functional.cross_entropy if self.num_classes else nn.functional.mse_loss
        )
        return Trainee(model, optimizer, batches, criterion, device)


def reference_mlp(depth: int = 24, width: int = 512) -> nn.Sequential:
    """DESIGN.md's reference model: ``depth`` x [Linear(width), LayerNorm(width), GELU]."""
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*blocks)


def small_cnn() -> nn.Sequential:
    """A small CNN for 3x32x32 inputs: 4 conv/BatchNorm/ReLU blocks, pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


class ResidualStack(nn.Module):
    """``depth`` residual steps ``x + tanh(Linear(x))``: many small tensors, finite values.

    Args:
        depth: Number of Linear layers (two parameter tensors each).
        width: Width of every layer.
    """

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.scale = 1.0 / math.sqrt(depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.scale * torch.tanh(layer(x))
        return x


REFERENCE = Workload(
    name="reference MLP",
    description=(
        "24 x [Linear(512), LayerNorm(512), GELU], AdamW, batch 64 (96 tensors, 6.3M params)"
    ),
    build_model=reference_mlp,
    input_shape=(64, 512),
    output_dim=512,
)
CNN = Workload(
    name="small CNN",
    description="4 x [Conv3x3, BatchNorm, ReLU] + linear head, AdamW, batch 32 of 3x32x32",
    build_model=small_cnn,
    input_shape=(32, 3, 32, 32),
    num_classes=10,
    lr=1e-3,
)
MANY_SMALL = Workload(
    name="1,000 small tensors",
    description=(
        "500 x residual [Linear(16,16), tanh], AdamW, batch 64 (1,000 tensors, 136k params)"
    ),
    build_model=lambda: ResidualStack(500, 16),
    input_shape=(64, 16),
    output_dim=16,
)
WORKLOADS = (REFERENCE, CNN, MANY_SMALL)


# ---------------------------------------------------------------------------------------- variants


class Monitor(Protocol):
    """What a variant does between ``loss.backward()`` and ``optimizer.step()``."""

    def after_backward(self, loss: torch.Tensor) -> bool:
        """Does the variant's work; returns True when the optimizer update must be skipped."""
        ...

    def close(self) -> None:
        """Releases files and hooks."""
        ...


class Unavailable(Exception):
    """A variant cannot run here (a gradwatch feature or an optional package is missing)."""


@dataclass(frozen=True)
class Variant:
    """A named way of monitoring a training step.

    Attributes:
        name: Row label in tables.
        make: ``make(trainee, workdir) -> Monitor``; raises :class:`Unavailable` with a reason.
        target_pp: The DESIGN.md target in percentage points over the floor, if there is one.
        optimizer: Keyword arguments of :meth:`Workload.instantiate` (``fused``, ``tensor_lr``).
    """

    name: str
    make: Callable[[Trainee, Path], Monitor]
    target_pp: float | None = None
    optimizer: dict[str, bool] = field(default_factory=dict)


class _Bare:
    def after_backward(self, loss: torch.Tensor) -> bool:
        return False

    def close(self) -> None:
        pass


class _Floor:
    """One ``torch._foreach_norm`` over the gradients: the cheapest possible read of all of them."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def after_backward(self, loss: torch.Tensor) -> bool:
        torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        return False

    def close(self) -> None:
        pass


class GradWatchMonitor:
    """Drives a real ``gw.GradWatch`` the way the README tells users to.

    With ``read_skip=False`` the loop calls ``optimizer.step()`` on every step without reading
    ``report.skipped`` (a fused optimizer skips inside its kernel).
    """

    def __init__(self, trainee: Trainee, read_skip: bool = True, **kwargs: Any) -> None:
        import gradwatch as gw

        self.watch = gw.GradWatch(trainee.model, trainee.optimizer, **kwargs)
        self.read_skip = read_skip

    def after_backward(self, loss: torch.Tensor) -> bool:
        report = self.watch.step(loss=loss)
        return report.skipped if self.read_skip else False

    def close(self) -> None:
        self.watch.close()


def _layer_params(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    layers = []
    for module_name, module in model.named_modules():
        own = [
            (f"{module_name}.{name}" if module_name else name, p)
            for name, p in module.named_parameters(recurse=False)
            if p.requires_grad
        ]
        if own:
            layers.append((module_name or "<root>", own))
    return layers


class _HandWritten:
    """The usual hand-written monitoring (what DESIGN.md calls "the hand-written way").

    Every step: one ``p.grad.norm().item()`` per parameter, combined into a per-layer norm on the
    host, one ``SummaryWriter.add_scalar`` per layer. Every 100 steps: ``add_histogram`` of every
    parameter's gradient.
    """

    def __init__(self, trainee: Trainee, workdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "handwritten"))
        self.layers = _layer_params(trainee.model)
        self.step = 0

    def after_backward(self, loss: torch.Tensor) -> bool:
        for layer_name, params in self.layers:
            sq = 0.0
            for _, param in params:
                if param.grad is not None:
                    sq += param.grad.norm().item() ** 2
            self.writer.add_scalar(f"grad_norm/{layer_name}", math.sqrt(sq), self.step)
        if self.step % HANDWRITTEN_HISTOGRAM_EVERY == 0:
            for _, params in self.layers:
                for name, param in params:
                    if param.grad is not None:
                        self.writer.add_histogram(f"grad_hist/{name}", param.grad, self.step)
        self.step += 1
        return False

    def close(self) -> None:
        self.writer.close()


class _LightningGradNorm:
    """Lightning's recipe: ``grad_norm(module, norm_type=2)`` every step, logged like ``log_dict``.

    Lightning's ``log_dict(..., on_step=True)`` keeps the latest tensors and writes them to the
    logger every ``log_every_n_steps`` (default 50): here one ``SummaryWriter.add_scalar`` per key
    every 50 steps. Lightning's own ``ResultCollection`` bookkeeping for each ``log`` call is not
    included, so this is a lower bound of what the recipe costs inside a ``Trainer``.
    """

    def __init__(self, trainee: Trainee, workdir: Path) -> None:
        try:
            from pytorch_lightning.utilities import grad_norm
        except ImportError as error:
            raise Unavailable("pytorch_lightning is not installed") from error
        from torch.utils.tensorboard import SummaryWriter

        self.grad_norm = grad_norm
        self.model = trainee.model
        self.writer = SummaryWriter(str(workdir / "lightning"))
        self.latest: dict[str, torch.Tensor] = {}
        self.step = 0

    def after_backward(self, loss: torch.Tensor) -> bool:
        self.latest = self.grad_norm(self.model, norm_type=2)
        if (self.step + 1) % LIGHTNING_LOG_EVERY == 0:
            for key, value in self.latest.items():
                self.writer.add_scalar(key, float(value), self.step)
        self.step += 1
        return False

    def close(self) -> None:
        self.writer.close()


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise Unavailable(reason)


def _tensorboard_kwargs(workdir: Path, tag: str) -> dict[str, Any]:
    return {"logdir": str(workdir / tag)}


def _make_default(trainee: Trainee, workdir: Path) -> Monitor:
    return GradWatchMonitor(trainee, **_tensorboard_kwargs(workdir, "default"))


def _make_remedies(trainee: Trainee, workdir: Path) -> Monitor:
    import gradwatch as gw

    remedies = [gw.ZClip(), gw.LRBackoff(), gw.SkipStep()]
    return GradWatchMonitor(trainee, remedies=remedies, **_tensorboard_kwargs(workdir, "remedies"))


def _make_histograms(trainee: Trainee, workdir: Path) -> Monitor:
    return GradWatchMonitor(
        trainee,
        histogram_every_n_steps=HANDWRITTEN_HISTOGRAM_EVERY,
        check_activations=True,
        **_tensorboard_kwargs(workdir, "histograms"),
    )


BARE = Variant("bare step", lambda trainee, workdir: _Bare())
FLOOR = Variant("floor: bare `_foreach_norm`", lambda trainee, workdir: _Floor(trainee.model))
PROBE = Variant(
    "gradwatch probe (`detectors=()`)",
    lambda trainee, workdir: GradWatchMonitor(trainee, detectors=()),
    target_pp=0.5,
)
DEFAULT = Variant("gradwatch default + TensorBoard", _make_default, target_pp=1.5)
REMEDIES = Variant("gradwatch + ZClip, LRBackoff, SkipStep", _make_remedies)
HISTOGRAMS = Variant("gradwatch + histograms/100 + check_activations", _make_histograms)
HANDWRITTEN = Variant("hand-written `.norm().item()` + add_scalar/add_histogram", _HandWritten)
LIGHTNING = Variant("Lightning `grad_norm` + log_dict (lower bound)", _LightningGradNorm)
ALL_VARIANTS = (BARE, FLOOR, PROBE, DEFAULT, REMEDIES, HISTOGRAMS, HANDWRITTEN, LIGHTNING)


class _ClipGradNorm:
    """``torch.nn.utils.clip_grad_norm_(params, 1.0)``: what clipping costs without gradwatch."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def after_backward(self, loss: torch.Tensor) -> bool:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        return False

    def close(self) -> None:
        pass


def _make_clip_skip(trainee: Trainee, workdir: Path) -> Monitor:
    import gradwatch as gw

    return GradWatchMonitor(
        trainee,
        read_skip=not trainee.optimizer.defaults.get("fused"),  # fused: the kernel skips itself
        remedies=[gw.ZClip(), gw.SkipStep()],
        **_tensorboard_kwargs(workdir, "clip_skip"),
    )


def _make_all_remedies(trainee: Trainee, workdir: Path) -> Monitor:
    import gradwatch as gw

    return GradWatchMonitor(
        trainee,
        read_skip=not trainee.optimizer.defaults.get("fused"),
        remedies=[gw.ZClip(), gw.LRBackoff(), gw.SkipStep()],
        **_tensorboard_kwargs(workdir, "all_remedies"),
    )


CLIP_GRAD_NORM = Variant(
    "`torch.nn.utils.clip_grad_norm_(1.0)`", lambda trainee, workdir: _ClipGradNorm(trainee.model)
)
CLIP_SKIP = Variant("gradwatch default + ZClip, SkipStep", _make_clip_skip)
FUSED = {"fused": True}
FUSED_TENSOR_LR = {"fused": True, "tensor_lr": True}
FUSED_VARIANTS = (
    Variant("bare step", BARE.make, optimizer=FUSED),
    Variant(FLOOR.name, FLOOR.make, optimizer=FUSED),
    Variant(DEFAULT.name, DEFAULT.make, optimizer=FUSED),
    Variant(CLIP_SKIP.name, CLIP_SKIP.make, optimizer=FUSED),
    Variant(
        "gradwatch default + ZClip, LRBackoff, SkipStep (tensor lr)",
        _make_all_remedies,
        optimizer=FUSED_TENSOR_LR,
    ),
    Variant(CLIP_GRAD_NORM.name, CLIP_GRAD_NORM.make, optimizer=FUSED),
)
"""The remedies benchmark with ``AdamW(fused=True)``: clipping and skipping inside the kernel."""
EXPLICIT_VARIANTS = (
    BARE,
    FLOOR,
    DEFAULT,
    CLIP_SKIP,
    Variant("gradwatch default + ZClip, LRBackoff, SkipStep", _make_all_remedies),
    CLIP_GRAD_NORM,
)
"""The same with the default (non-fused) AdamW: the explicit path."""


# ------------------------------------------------------------------------------------- measurement


@dataclass
class VariantResult:
    """Per-round step times of one variant and the statistics the tables print.

    Attributes:
        variant: The variant.
        times: Step time in seconds, one per round (aligned with the bare step's).
        skipped: Why the variant did not run, or None.
        warnings: gradwatch warnings seen while it ran (a failing step would make it look cheap).
    """

    variant: Variant
    times: list[float] = field(default_factory=list)
    skipped: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class PairedResult:
    """The outcome of one paired run.

    Attributes:
        workload: What was trained.
        device: Where.
        rounds: Measured rounds (each variant one step per round).
        results: One entry per variant, the bare step first.
    """

    workload: Workload
    device: torch.device
    rounds: int
    results: list[VariantResult]

    def times_of(self, name: str) -> list[float]:
        """Per-round times of the variant called ``name``."""
        for result in self.results:
            if result.variant.name == name:
                return result.times
        raise KeyError(name)

    @property
    def bare(self) -> list[float]:
        """Per-round times of the bare step."""
        return self.results[0].times


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """25th percentile, median and 75th percentile."""
    if len(values) < 2:
        value = values[0] if values else math.nan
        return value, value, value
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def overhead_percent(times: Sequence[float], bare: Sequence[float]) -> tuple[float, float, float]:
    """Per-round ``(t / t_bare - 1) * 100``: 25th percentile, median, 75th percentile."""
    return quantiles([(t / b - 1.0) * 100.0 for t, b in zip(times, bare, strict=True)])


def points_over(times: Sequence[float], floor: Sequence[float], bare: Sequence[float]) -> float:
    """Median over rounds of ``(t - t_floor) / t_bare * 100``, in points of the bare step."""
    return statistics.median(
        (t - f) / b * 100.0 for t, f, b in zip(times, floor, bare, strict=True)
    )


def amortised_points_over(
    times: Sequence[float], reference: Sequence[float], bare: Sequence[float]
) -> float:
    """Median over blocks of :data:`BLOCK_ROUNDS` rounds of ``(sum(t) - sum(t_ref)) / sum(t_bare)``,
    in points of the bare step: what a variant costs beyond another one, periodic work included."""
    size = min(BLOCK_ROUNDS, len(times))
    blocks = [
        (sum(times[i : i + size]) - sum(reference[i : i + size])) / sum(bare[i : i + size]) * 100
        for i in range(0, len(times) - size + 1, size)
    ]
    return statistics.median(blocks) if blocks else math.nan


def extra_microseconds(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``t - t_reference`` in microseconds."""
    return statistics.median((t - r) * 1e6 for t, r in zip(times, reference, strict=True))


def amortised_percent(times: Sequence[float], bare: Sequence[float]) -> float:
    """Median over blocks of :data:`BLOCK_ROUNDS` rounds of ``sum(t) / sum(t_bare) - 1``, in %.

    With fewer rounds than one block, the whole run is one block.
    """
    size = min(BLOCK_ROUNDS, len(times))
    blocks = [
        (sum(times[i : i + size]) / sum(bare[i : i + size]) - 1.0) * 100.0
        for i in range(0, len(times) - size + 1, size)
    ]
    return statistics.median(blocks) if blocks else math.nan


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainee: Trainee, monitor: Monitor) -> float:
    """One full training step with the monitor's work after backward; returns seconds."""
    _synchronize(trainee.device)
    start = time.perf_counter()
    loss = trainee.forward_backward()
    skip = monitor.after_backward(loss)
    trainee.finish(skip)
    _synchronize(trainee.device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _collect_gradwatch_warnings(into: list[str]) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        text = str(warning.message)
        if "gradwatch" in text.lower() and text not in into:
            into.append(text)


def run_paired(
    workload: Workload,
    variants: Sequence[Variant],
    workdir: Path,
    *,
    rounds: int,
    warmup: int,
    device: torch.device | None = None,
) -> PairedResult:
    """Trains one copy of ``workload`` per variant, alternating them step by step.

    Args:
        workload: What to train.
        variants: The variants; the first must be the bare step.
        workdir: Where TensorBoard event files go.
        rounds: Measured rounds.
        warmup: Unmeasured rounds first (allocator, caches, gradwatch's first-step setup).
        device: Where to train (CPU by default).

    Returns:
        Every variant's per-round times, or why it was skipped.
    """
    if variants[0].make is not BARE.make:
        raise ValueError("the first variant must be a bare step")
    device = device or torch.device("cpu")
    results: list[VariantResult] = []
    running: list[tuple[VariantResult, Trainee, Monitor]] = []
    for variant in variants:
        result = VariantResult(variant)
        results.append(result)
        trainee = workload.instantiate(device, **variant.optimizer)
        try:
            with _collect_gradwatch_warnings(result.warnings):
                monitor = variant.make(trainee, workdir)
        except Unavailable as reason:
            result.skipped = str(reason)
            continue
        running.append((result, trainee, monitor))
    started = time.perf_counter()
    print(
        f"[{workload.name}] {len(running)} variants, {warmup} warm-up + {rounds} rounds",
        file=sys.stderr,
        flush=True,
    )
    try:
        for _ in range(warmup):
            for result, trainee, monitor in running:
                with _collect_gradwatch_warnings(result.warnings):
                    timed_step(trainee, monitor)
        gc.collect()
        order = random.Random(0)
        for round_index in range(rounds):
            # A fresh random order every round. (A rotation keeps every variant right after the same
            # neighbour, whose background work, e.g. a TensorBoard writer thread drawing an image
            # after its flush, then lands on that variant's step every time.)
            for result, trainee, monitor in order.sample(running, len(running)):
                with _collect_gradwatch_warnings(result.warnings):
                    result.times.append(timed_step(trainee, monitor))
            if (round_index + 1) % max(1, rounds // 5) == 0:
                print(
                    f"[{workload.name}] round {round_index + 1}/{rounds}, "
                    f"{time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for result, _, monitor in running:
            with _collect_gradwatch_warnings(result.warnings):
                monitor.close()
    return PairedResult(workload, device, rounds, results)


# --------------------------------------------------------------------------------------- GPU syncs


def count_host_syncs(
    workload: Workload, variant: Variant, workdir: Path, *, steps: int, warmup: int
) -> float:
    """Host synchronisations per step inside the variant's own work, on CUDA.

    ``torch.cuda.set_sync_debug_mode("warn")`` is switched on only around ``after_backward`` and the
    optimizer step (where remedies act with a fused optimizer), so the model's own syncs, if any,
    are not counted; every warning it emits is counted. The bare step's optimizer step has none.

    NOT RUN on the machine these benchmarks were written on (no GPU): the code path exists so the
    same script reports it wherever CUDA is available.
    """
    device = torch.device("cuda")
    trainee = workload.instantiate(device, **variant.optimizer)
    monitor = variant.make(trainee, workdir)
    syncs = 0
    try:
        for index in range(warmup + steps):
            loss = trainee.forward_backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainee.finish(monitor.after_backward(loss))
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            if index >= warmup:
                syncs += sum("synchroniz" in str(w.message).lower() for w in caught)
    finally:
        monitor.close()
    return syncs / steps


# ------------------------------------------------------------------------------------------ tables


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--threads`` and ``--device``, shared by every benchmark script."""
    parser.add_argument(
        "--quick", action="store_true", help="few rounds: a smoke run, noisy numbers"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch.set_num_threads (2 is the reference; on a loaded machine 1 avoids OpenMP "
        "spin-wait stalls that make 2-thread timings meaningless)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    """One line naming the CPU, core count, threads and library versions."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch.set_num_threads({torch.get_num_threads()}), {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
