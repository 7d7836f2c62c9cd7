"""gradwatch under real process groups: two gloo CPU processes running FSDP2 and DDP.

One spawn runs every scenario on both ranks (spawning costs seconds, the scenarios milliseconds);
each rank writes its measurements to a JSON file and the tests below compare the two ranks with
each other and with the full (unsharded) gradients.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradwatch as gw
from gradwatch.engine.alerts import AlertKind
from gradwatch.engine.detectors import Detector, default_detectors
from gradwatch.engine.layers import Layer
from gradwatch.engine.observation import Detection, Observation
from gradwatch.engine.probe import GradientProbe
from gradwatch.engine.profile import ModelProfile
from gradwatch.engine.records import FlushRecord
from gradwatch.sinks.base import Sink
from tests.helpers import count_syncs

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
SPAWN_DEADLINE_S = 150.0  # the whole spawn takes ~15 s; a broken collective times out after 60 s
MAX_NORM = 0.05
SPIKE_STEPS = (2, 4)
RTOL = 1e-6


# ---------------------------------------------------------------------------- models


class UnevenNet(nn.Module):
    """Parameters FSDP2 shards unevenly over two ranks (rank 1 gets empty shards of size-1 dims)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 1.5))  # a root-level parameter, layer ""
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def _batch(step: int, rank: int) -> torch.Tensor:
    """Each rank's own inputs (different on every rank, reproducible from anywhere)."""
    generator = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randn(4, 3, generator=generator)


def _sharded_net(*, root: bool) -> UnevenNet:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = UnevenNet()
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    if root:
        fully_shard(model)
    return model


# ---------------------------------------------------------------------------- test components


class NormAbove(Detector):
    """Fires when the total gradient norm exceeds ``threshold``; names layers by their norm."""

    kind = AlertKind.EXPLODING

    def observe(self, obs: Observation) -> Detection:
        return Detection(fired=obs.totals > self.threshold, value=obs.totals, scores=obs.norms)

    def message(self, value: float, layers: tuple[str, ...]) -> str:
        return f"total gradient norm {value!r} above {self.threshold} in {layers}"


class RecordingSink(Sink):
    """Keeps every flush record (sinks only exist on rank 0)."""

    def __init__(self) -> None:
        self.records: list[FlushRecord] = []

    def write(self, record: FlushRecord) -> None:
        self.records.append(record)


class FileSink(Sink):
    """Appends one line per flush to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: FlushRecord) -> None:
        with self.path.open("a") as file:
            file.write(f"{record.last_step}\n")


# ---------------------------------------------------------------------------- rank-side helpers


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for DTensors: every rank must call it)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def _full_layer_norms(model: nn.Module, *, of_grads: bool = True) -> dict[str, float]:
    """Per-module L2 norms of the full gradients (or weights), in float64."""
    norms = {}
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            tensors = [_full(p.grad if of_grads else p.detach()) for p in params]  # type: ignore[arg-type]
            norms[name] = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    return norms


@contextlib.contextmanager
def _count_all_reduces() -> Iterator[list[int]]:
    """Counts ``torch.distributed.all_reduce`` calls while active."""
    calls = [0]
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


class ListHandler(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _report_values(report: gw.StepReport) -> dict[str, Any]:
    return {
        "step": report.step,
        "skipped": report.skipped,
        "lr_scale": report.lr_scale,
        "total_norm": None if report.total_norm is None else float(report.total_norm),
        "clip_coef": None if report.clip_coef is None else float(report.clip_coef),
        "alerts": [repr(alert) for alert in report.alerts],
    }


def _gradwatch_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "gradwatch" in str(w.message).lower()]


# ---------------------------------------------------------------------------- scenarios


def _scenario_fsdp_uneven(rank: int, outdir: Path) -> dict[str, Any]:
    """FSDP2 on every module with uneven (and empty) shards: norms of the full gradients."""
    model = _sharded_net(root=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = RecordingSink()
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=2, detectors=(), sinks=[sink])
    steps = []
    expected_weights = []
    for step in range(3):
        model(_batch(step, rank)).pow(2).mean().backward()
        with _count_all_reduces() as all_reduces, count_syncs() as syncs:
            report = watch.step()
        expected = _full_layer_norms(model)
        expected_weights.append(_full_layer_norms(model, of_grads=False))
        steps.append(
            {
                "all_reduces": all_reduces[0],
                "host_syncs": sum(syncs.values()),
                "expected": expected,
                "got": watch.last_norms(),
                "total_norm": float(report.total_norm),  # type: ignore[arg-type]
                "local_shard_numels": [p.grad.to_local().numel() for p in model.parameters()],  # type: ignore[union-attr]
            }
        )
        optimizer.step()
        optimizer.zero_grad()
    watch.close()
    return {
        "layer_names": watch.layer_names,
        "steps": steps,
        "step_count": watch.step_count,
        "expected_weight_norms": expected_weights,
        "recorded_weight_norms": {
            record.last_step: dict(
                zip(record.layer_names, record.weight_norms.tolist(), strict=True)
            )
            for record in sink.records
        },
    }


def _scenario_fsdp_submodules(rank: int, outdir: Path) -> dict[str, Any]:
    """FSDP2 on submodules only: the root parameter stays a plain tensor, synced by the user."""
    model = _sharded_net(root=False)
    watch = gw.GradWatch(model, log_every_n_steps=1, detectors=())
    steps = []
    for step in range(2):
        model(_batch(step, rank)).pow(2).mean().backward()
        dist.all_reduce(model.scale.grad)  # type: ignore[arg-type]  # unsharded params are the user's job
        model.scale.grad /= WORLD_SIZE  # type: ignore[operator]
        watch.step()
        steps.append({"expected": _full_layer_norms(model), "got": watch.last_norms()})
        model.zero_grad()
    watch.close()
    profile = ModelProfile.inspect(model)
    return {
        "plain_root": not hasattr(model.scale, "to_local"),
        "steps": steps,
        "profile": [profile.he_ratio, profile.xavier_ratio, sorted(profile.init_ratios.items())],
    }


def _scenario_placements(rank: int, outdir: Path) -> dict[str, Any]:
    """Tensor-parallel style DTensors: uneven Shard(1), Replicate, 2-D and sub-meshes, plain."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    mesh_2d = init_device_mesh("cpu", (WORLD_SIZE, 1), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)  # same full tensors on every rank
    specs = {
        "column_sharded": (torch.randn(4, 5), mesh, [Shard(1)]),  # 5 columns: 3 and 2
        "replicated": (torch.randn(3), mesh, [Replicate()]),
        "hybrid": (torch.randn(3, 2), mesh_2d, [Replicate(), Shard(0)]),
        "sub_mesh": (torch.randn(3, 2), mesh_2d["tp"], [Shard(0)]),  # one copy per 1-rank group
        "plain": (torch.randn(2), None, None),
    }
    layers = []
    full_grads = {}
    for name, (value, device_mesh, placements) in specs.items():
        module = nn.Module()
        if device_mesh is None:
            param = nn.Parameter(value.clone())
            param.grad = torch.randn_like(value)
            full_grads[name] = param.grad
        else:
            param = nn.Parameter(distribute_tensor(value, device_mesh, placements))
            grad = torch.randn_like(value)
            param.grad = distribute_tensor(grad, device_mesh, placements)
            full_grads[name] = grad
        module.weight = param
        layers.append(Layer(name, module, [param]))
    probe = GradientProbe(layers, torch.device("cpu"))
    pattern = probe.grad_pattern()
    with _count_all_reduces() as all_reduces:
        sq_norms, _ = probe.grad_sq_norms(pattern)
    return {
        "names": list(specs),
        "got": sq_norms.sqrt().tolist(),
        "expected": [float(full_grads[name].double().norm()) for name in specs],
        "all_reduces": all_reduces[0],
    }


def _scenario_fsdp_clip(rank: int, outdir: Path) -> dict[str, Any]:
    """ClipNorm under FSDP2 clips the global gradient norm, identically on every rank."""
    model = _sharded_net(root=True)
    watch = gw.GradWatch(model, log_every_n_steps=1, detectors=(), remedies=[gw.ClipNorm(MAX_NORM)])
    model(_batch(0, rank)).pow(2).mean().backward()
    before = math.sqrt(sum(v * v for v in _full_layer_norms(model).values()))
    report = watch.step()
    after = _full_layer_norms(model)
    watch.close()
    return {
        "before": before,
        "after_total": math.sqrt(sum(v * v for v in after.values())),
        "report": _report_values(report),
    }


def _scenario_fsdp_matches_one_process(rank: int, outdir: Path) -> dict[str, Any]:
    """AGC then ClipNorm under FSDP2 leave the gradients one process leaves on the whole batch."""

    def remedies() -> list[gw.Remedy]:
        return [gw.AGC(clipping=0.05, exclude=("vectors",)), gw.ClipNorm(0.5)]

    torch.manual_seed(0)
    reference = UnevenNet()
    model = _sharded_net(root=True)  # same seed: same initial weights
    watch = gw.GradWatch(model, log_every_n_steps=1, detectors=(), remedies=remedies())
    reference_watch = gw.GradWatch(
        reference, log_every_n_steps=1, detectors=(), remedies=remedies()
    )
    model(_batch(0, rank)).pow(2).mean().backward()  # FSDP2 averages the two ranks' gradients
    reference(torch.cat([_batch(0, r) for r in range(WORLD_SIZE)])).pow(2).mean().backward()
    report, reference_report = watch.step(), reference_watch.step()
    grads = {name: _full(p.grad).tolist() for name, p in model.named_parameters()}  # type: ignore[arg-type]
    reference_grads = {name: p.grad.tolist() for name, p in reference.named_parameters()}  # type: ignore[union-attr]
    return {
        "grads": grads,
        "reference_grads": reference_grads,
        "clip_coef": float(report.clip_coef),  # type: ignore[arg-type]
        "reference_clip_coef": float(reference_report.clip_coef),  # type: ignore[arg-type]
    }


def _scenario_fsdp_decisions(rank: int, outdir: Path) -> dict[str, Any]:
    """Alerts, remedies' host decisions and step reports, with different data on every rank."""
    model = _sharded_net(root=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    callbacks: list[str] = []
    logdir = outdir / "tb"
    tensorboard = _tensorboard_sink_exists()
    watch = gw.GradWatch(
        model,
        optimizer,
        logdir=logdir if tensorboard else None,
        log_every_n_steps=3,
        detectors=[*default_detectors(), NormAbove(threshold=20.0)],
        remedies=[gw.SkipStep(on=("exploding",)), gw.LRBackoff(), gw.ClipNorm(1e3)],
        on_alert=lambda alert: callbacks.append(repr(alert)),
        sinks=[FileSink(outdir / f"flushes-rank{rank}.txt")],
    )
    reports = []
    logged = ListHandler()
    logging.getLogger("gradwatch").addHandler(logged)
    try:
        for step in range(6):
            loss = model(_batch(step, rank)).pow(2).mean()
            (loss * (1e4 if step in SPIKE_STEPS else 1.0)).backward()
            reports.append(_report_values(watch.step(loss)))
            optimizer.step()
            optimizer.zero_grad()
        watch.close()
    finally:
        logging.getLogger("gradwatch").removeHandler(logged)
    return {
        "reports": reports,
        "alerts": [repr(alert) for alert in watch.alerts],
        "alert_steps": [alert.step for alert in watch.alerts if alert.kind is AlertKind.EXPLODING],
        "callbacks": callbacks,
        "logged": logged.messages,
        "history": {name: values.tolist() for name, values in watch.history().items()},
        "tensorboard": tensorboard,
        "pid": os.getpid(),
    }


def _scenario_ddp(rank: int, outdir: Path) -> dict[str, Any]:
    """DDP: norms of the averaged gradients, no gradwatch communication, one-process reference."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    reference = UnevenNet()
    model = DistributedDataParallel(copy.deepcopy(reference))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=1, detectors=())
    steps = []
    for step in range(2):
        model(_batch(step, rank)).pow(2).mean().backward()
        with _count_all_reduces() as all_reduces:
            watch.step()
        combined = torch.cat([_batch(step, r) for r in range(WORLD_SIZE)])
        reference(combined).pow(2).mean().backward()
        steps.append(
            {
                "all_reduces": all_reduces[0],
                "got": watch.last_norms(),
                "expected": _full_layer_norms(reference),
            }
        )
        for opt in (optimizer, reference_optimizer):
            opt.step()
            opt.zero_grad()
    watch.close()
    return {"layer_names": watch.layer_names, "steps": steps}


def _tensorboard_sink_exists() -> bool:
    try:
        import gradwatch.sinks.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "fsdp_uneven": _scenario_fsdp_uneven,
    "fsdp_submodules": _scenario_fsdp_submodules,
    "placements": _scenario_placements,
    "fsdp_clip": _scenario_fsdp_clip,
    "fsdp_matches_one_process": _scenario_fsdp_matches_one_process,
    "fsdp_decisions": _scenario_fsdp_decisions,
    "ddp": _scenario_ddp,
}


def _worker(rank: int, port: int, outdir: str) -> None:
    """Runs every scenario on one rank and writes ``rank<r>.json`` (errors included)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    results: dict[str, Any] = {}
    try:
        for name, scenario in SCENARIOS.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    results[name] = scenario(rank, Path(outdir))
                except Exception:
                    results[name] = {"error": traceback.format_exc()}
                    break  # the other rank is now out of step: stop both (its collective times out)
            results[name]["warnings"] = _gradwatch_warnings(caught)
    finally:
        (Path(outdir) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
    # Gloo's C++ worker threads can still hold finished work during interpreter finalisation and
    # abort the process there (pytorch/pytorch#179291, about one spawn in six here): the results
    # are written, so leave without finalising.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------- the parent side


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def spawn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the two ranks once for the whole module; returns the directory they wrote to."""
    outdir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(outdir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed workers did not finish within {SPAWN_DEADLINE_S} s")
    return outdir


@pytest.fixture(scope="module")
def ranks(spawn_dir: Path) -> list[dict[str, Any]]:
    """Per-rank results, rank 0 first."""
    return [json.loads((spawn_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def _scenario(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    per_rank = [
        results.get(name, {"error": "not run (an earlier scenario failed)"}) for results in ranks
    ]
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"rank {rank}: {result['error']}"
        assert result["warnings"] == [], f"rank {rank} warned: {result['warnings']}"
    return per_rank


def _assert_norms_close(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=RTOL, abs=1e-9), name


def test_fsdp2_uneven_shards_give_the_norms_of_the_full_gradients(
    ranks: list[dict[str, Any]],
) -> None:
    per_rank = _scenario(ranks, "fsdp_uneven")
    assert per_rank[0]["layer_names"] == per_rank[1]["layer_names"]
    assert set(per_rank[0]["layer_names"]) == {"", "fc1", "fc2"}  # original paths, root included
    assert per_rank[1]["steps"][0]["local_shard_numels"].count(0) == 3  # empty shards on rank 1
    for result in per_rank:
        assert result["step_count"] == 3
        for step in result["steps"]:
            _assert_norms_close(step["got"], step["expected"])
            total = math.sqrt(sum(v * v for v in step["expected"].values()))
            assert step["total_norm"] == pytest.approx(total, rel=RTOL)
    for step0, step1 in zip(per_rank[0]["steps"], per_rank[1]["steps"], strict=True):
        assert step0["got"] == step1["got"]  # bit-identical on both ranks


def test_fsdp2_communicates_one_all_reduce_per_step_and_never_syncs(
    ranks: list[dict[str, Any]],
) -> None:
    for result in _scenario(ranks, "fsdp_uneven"):
        # gradients every step, weights too at step 0 and at flush steps (log_every_n_steps=2)
        assert [step["all_reduces"] for step in result["steps"]] == [2, 2, 1]
        # step 0 builds the context (one-off host reads), step 1 flushes; step 2 must not sync
        assert result["steps"][2]["host_syncs"] == 0


def test_fsdp2_weight_norms_are_those_of_the_full_weights(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = _scenario(ranks, "fsdp_uneven")
    assert rank1["recorded_weight_norms"] == {}  # sinks live on rank 0 only
    recorded = rank0["recorded_weight_norms"]
    for step in (0, 1):  # refreshed at step 0 and at the flush step 1
        _assert_norms_close(recorded[str(step)], rank0["expected_weight_norms"][step])


def test_fsdp2_on_submodules_weights_plain_root_parameters_once(
    ranks: list[dict[str, Any]],
) -> None:
    per_rank = _scenario(ranks, "fsdp_submodules")
    for result in per_rank:
        assert result["plain_root"]
        for step in result["steps"]:
            _assert_norms_close(step["got"], step["expected"])
    assert per_rank[0]["steps"] == per_rank[1]["steps"]


def test_model_profile_is_the_same_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = _scenario(ranks, "fsdp_submodules")
    assert (
        rank0["profile"] == rank1["profile"]
    )  # advice must not depend on which shard a rank holds


def test_remedies_under_fsdp2_leave_the_gradients_of_one_process(
    ranks: list[dict[str, Any]],
) -> None:
    for result in _scenario(ranks, "fsdp_matches_one_process"):
        assert result["reference_clip_coef"] < 0.5  # both remedies really act
        assert result["clip_coef"] == pytest.approx(result["reference_clip_coef"], rel=1e-5)
        for name, reference in result["reference_grads"].items():
            got = torch.tensor(result["grads"][name])
            assert torch.allclose(got, torch.tensor(reference), rtol=1e-5, atol=1e-7), name


def test_tensor_parallel_placements_count_every_element_once(ranks: list[dict[str, Any]]) -> None:
    for result in _scenario(ranks, "placements"):
        assert result["got"] == pytest.approx(result["expected"], rel=RTOL)
        assert result["all_reduces"] == 1


def test_clip_norm_bounds_the_global_norm_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    per_rank = _scenario(ranks, "fsdp_clip")
    for result in per_rank:
        assert result["before"] > 2 * MAX_NORM  # the clip really acts
        assert result["after_total"] == pytest.approx(MAX_NORM, rel=1e-4)
        assert result["report"]["clip_coef"] == pytest.approx(MAX_NORM / result["before"], rel=1e-4)
    assert per_rank[0]["report"] == per_rank[1]["report"]


def test_alerts_and_decisions_are_identical_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = _scenario(ranks, "fsdp_decisions")
    assert rank0["alert_steps"][:1] == [SPIKE_STEPS[0]]
    assert rank0["alerts"] == rank1["alerts"]
    assert (
        rank0["callbacks"] == rank1["callbacks"] == rank0["alerts"]
    )  # on_alert runs on every rank
    assert rank0["reports"] == rank1["reports"]
    assert [r["skipped"] for r in rank0["reports"]] == [s in SPIKE_STEPS for s in range(6)]
    assert rank0["history"] == rank1["history"]


def test_only_rank_zero_prints(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = _scenario(ranks, "fsdp_decisions")
    assert len(rank0["logged"]) >= len(rank0["alerts"]) > 0
    assert rank1["logged"] == []


def test_only_rank_zero_writes(ranks: list[dict[str, Any]], spawn_dir: Path) -> None:
    rank0, _ = _scenario(ranks, "fsdp_decisions")
    assert (spawn_dir / "flushes-rank0.txt").read_text().split() == ["2", "5"]
    assert not (spawn_dir / "flushes-rank1.txt").exists()
    if not rank0["tensorboard"]:
        pytest.skip("gradwatch.sinks.tensorboard does not exist yet")
    event_files = sorted((spawn_dir / "tb").rglob("events.out.tfevents.*"))
    assert event_files
    # event file names end in ".<hostname>.<pid>.<n>": every one was written by rank 0's process
    assert {int(path.name.split(".")[-2]) for path in event_files} == {rank0["pid"]}


def test_ddp_norms_match_a_single_process_on_the_combined_batch(
    ranks: list[dict[str, Any]],
) -> None:
    per_rank = _scenario(ranks, "ddp")
    for result in per_rank:
        assert set(result["layer_names"]) == {"", "fc1", "fc2"}  # "module." prefix looked through
        for step in result["steps"]:
            assert step["all_reduces"] == 0  # DDP gradients are already averaged
            _assert_norms_close(step["got"], step["expected"])
    assert [s["got"] for s in per_rank[0]["steps"]] == [s["got"] for s in per_rank[1]["steps"]]
