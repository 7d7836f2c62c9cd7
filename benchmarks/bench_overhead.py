"""Overhead of gradwatch against the bare step, the floor and the usual baselines, paired.

Run ``python benchmarks/bench_overhead.py [--quick] [--profile]``. Every workload of
``common.WORKLOADS`` is trained once per variant of ``common.ALL_VARIANTS`` in one process, the
variants alternating step by step (see ``common.py`` for the statistics). ``--profile`` adds where
the time of ``watch.step()`` with ``detectors=()`` goes (cProfile, per function, µs per step).
On CUDA (``--device cuda``) the host synchronisations per step are counted as well.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    ALL_VARIANTS,
    BARE,
    FLOOR,
    PROBE,
    REFERENCE,
    WORKLOADS,
    GradWatchMonitor,
    PairedResult,
    Variant,
    add_common_arguments,
    amortised_percent,
    count_host_syncs,
    markdown_table,
    overhead_percent,
    points_over,
)

QUICK = {"rounds": 20, "warmup": 3}
FULL = {"rounds": 600, "warmup": 30}


def overhead_table(result: PairedResult) -> str:
    """One Markdown table: every variant of one paired run against the bare step and the floor."""
    bare = result.bare
    floor = result.times_of(FLOOR.name)
    bare_ms = sorted(bare)[len(bare) // 2] * 1e3
    rows = []
    for entry in result.results:
        name = entry.variant.name
        if entry.skipped is not None:
            rows.append([name, "-", "-", "-", "-", f"skipped: {entry.skipped}"])
            continue
        q1, median, q3 = overhead_percent(entry.times, bare)
        over_floor = points_over(entry.times, floor, bare)
        target = entry.variant.target_pp
        verdict = ""
        if target is not None:
            verdict = f"≤ {target} pp: {'met' if over_floor <= target else 'NOT met'}"
        if entry.warnings:
            verdict += f" warnings: {'; '.join(entry.warnings)}"
        if entry.variant is BARE:
            rows.append([name, f"{bare_ms:.2f} ms", "0", "0", "-", ""])
            continue
        rows.append(
            [
                name,
                f"{median:+.2f}%",
                f"[{q1:+.2f}, {q3:+.2f}]",
                f"{amortised_percent(entry.times, bare):+.2f}%",
                f"{over_floor:+.2f}",
                verdict.strip(),
            ]
        )
    header = ["variant", "overhead (median)", "IQR", "amortised", "pp over floor", "target"]
    title = (
        f"**{result.workload.name}** ({result.workload.description}; {result.device}, "
        f"{result.rounds} paired rounds; bare step {bare_ms:.2f} ms)"
    )
    return title + "\n\n" + markdown_table(header, rows)


def run(quick: bool, device: torch.device, workdir: Path) -> str:
    """Runs the paired overhead benchmark on every workload; returns Markdown."""
    from common import run_paired

    settings = QUICK if quick else FULL
    sections = []
    for workload in WORKLOADS:
        result = run_paired(
            workload,
            ALL_VARIANTS,
            workdir / workload.name.replace(" ", "_"),
            device=device,
            **settings,
        )
        sections.append(overhead_table(result))
    if device.type == "cuda":
        sections.append(host_sync_table(workdir, steps=20 if quick else 200))
    return "\n\n".join(sections)


def host_sync_table(workdir: Path, steps: int) -> str:
    """Host syncs per step of each variant on CUDA (``torch.cuda.set_sync_debug_mode``).

    UNTESTED on the machine the benchmarks were written on (no GPU).
    """
    rows = []
    for variant in ALL_VARIANTS[1:]:
        try:
            per_step = count_host_syncs(
                REFERENCE, variant, workdir / "syncs", steps=steps, warmup=5
            )
        except Exception as error:  # an unavailable variant or an unsupported debug mode
            rows.append([variant.name, f"not measured: {error}"])
            continue
        rows.append([variant.name, f"{per_step:.3f}"])
    return "**Host syncs per step on CUDA** (reference MLP)\n\n" + markdown_table(
        ["variant", "syncs / step"], rows
    )


def profile_probe(steps: int, device: torch.device) -> str:
    """Where the time of ``watch.step()`` with ``detectors=()`` goes: cProfile over ``steps`` steps.

    Only the ``watch.step`` calls are profiled (the profiler is enabled around each of them); the
    table lists the functions with the largest own time, in µs per step, next to the floor's.
    """
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for variant in (FLOOR, PROBE):
            rows += _profile_variant(variant, steps, device, Path(tmp))
    return (
        f"**Profile of one monitoring call** (reference MLP, {steps} steps, cProfile; own time per "
        "step; cProfile inflates Python-heavy code, compare the rows with each other)\n\n"
        + markdown_table(
            ["variant", "function", "calls / step", "own µs / step", "cum µs / step"], rows
        )
        + "\n\n"
        + component_table(steps, device)
    )


def component_table(repeats: int, device: torch.device) -> str:
    """Median µs of the pieces of ``watch.step()`` (``detectors=()``), called on fixed gradients.

    Diagnostic only: it reaches into gradwatch internals (``watch.engine.probe``), so each piece
    can be timed without a profiler's own overhead. The full ``watch.step()`` is repeated on the
    same gradients by clearing the watch's "same backward pass" fingerprint before each call.
    """
    trainee = REFERENCE.instantiate(device)
    monitor = GradWatchMonitor(trainee, detectors=())
    watch = monitor.watch
    loss = trainee.forward_backward()
    watch.step(loss=loss)
    grads = [p.grad for p in trainee.model.parameters() if p.grad is not None]

    engine = watch.engine

    def full_step() -> None:
        engine._fingerprint = None
        watch.step(loss=loss)

    try:
        probe = engine.probe
        pattern = probe.grad_pattern()
        pieces = {
            "floor: `torch._foreach_norm(grads)`": lambda: torch._foreach_norm(grads),
            "`probe.grad_pattern()`": probe.grad_pattern,
            "`probe.grad_sq_norms(pattern)` (foreach + stack + index_add)": lambda: (
                probe.grad_sq_norms(pattern)
            ),
            "`engine._grad_fingerprint(pattern)`": lambda: engine._grad_fingerprint(pattern),
            "full `watch.step(loss)` (flush every 50 calls included)": full_step,
        }
        rows = [
            [name, f"{_median_us(piece, repeats, device):.0f}"] for name, piece in pieces.items()
        ]
    except AttributeError as error:  # gradwatch internals changed: this diagnostic needs updating
        return f"*component timing not measured: {error}*"
    finally:
        monitor.close()
    return (
        f"**Pieces of `watch.step()`** (reference MLP, {len(grads)} gradients, median of "
        f"{repeats} calls on the same gradients)\n\n" + markdown_table(["piece", "µs"], rows)
    )


def _median_us(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _profile_variant(
    variant: Variant, steps: int, device: torch.device, workdir: Path
) -> list[list[str]]:
    trainee = REFERENCE.instantiate(device)
    monitor = variant.make(trainee, workdir)
    profiler = cProfile.Profile()
    for index in range(steps + 5):
        loss = trainee.forward_backward()
        if index >= 5:
            profiler.enable()
        skip = monitor.after_backward(loss)
        if index >= 5:
            profiler.disable()
        trainee.finish(skip)
    monitor.close()
    stats = pstats.Stats(profiler)
    entries = []
    for (filename, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        label = f"{Path(filename).name}:{line}({function})" if line else function
        entries.append((own, cumulative, calls, label))
    entries.sort(reverse=True)
    total_own = sum(own for own, _, _, _ in entries) / steps * 1e6
    rows = [[variant.name, "**total**", "", f"{total_own:.0f}", ""]]
    for own, cumulative, calls, label in entries[:12]:
        rows.append(
            [
                variant.name,
                f"`{label}`",
                f"{calls / steps:.1f}",
                f"{own / steps * 1e6:.1f}",
                f"{cumulative / steps * 1e6:.1f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="also profile watch.step()")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        print(run(args.quick, device, Path(tmp)))
    if args.profile:
        print()
        print(profile_probe(50 if args.quick else 200, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
