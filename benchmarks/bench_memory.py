"""Extra memory of gradwatch: RSS with and without, one fresh subprocess per variant.

Run ``python benchmarks/bench_memory.py [--quick]``. Each measurement is a new Python process
(peak RSS is a per-process high-water mark, so variants cannot share one). The child builds the
workload, trains a few bare steps so that the model, gradients, optimizer state and allocator
pools reach their steady size, reads the resident set size (``VmRSS``) and the peak
(``ru_maxrss``), then creates the variant's monitor, trains ``--steps`` more steps and reads both
again. The tables report that growth minus the growth of the bare run (allocator noise); the peak
column is often 0 because transient peaks of the settle phase already exceed the monitor's data.
Also ``tracemalloc``'s peak for Python-side objects (numpy
arrays, lists, alerts; torch tensors are invisible to it). The libraries a variant may import
(TensorBoard, matplotlib for the gradient-flow image, gradwatch) are imported in every child before
the baseline is read, so the rows show run-time data; the one-off import cost is its own row.

Two tables: every variant on the reference MLP (a copy of the gradients would be ~25 MB there), and
the probe on the 1,000-tensor model (500 layers) with a growing ``window`` to show the O(layers x
window) term: the device ring is ``window x layers`` float32, allocated at the first step; the
host mirror grows to the same size once ``window`` steps have passed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    BARE,
    DEFAULT,
    HANDWRITTEN,
    HISTOGRAMS,
    MANY_SMALL,
    PROBE,
    REFERENCE,
    GradWatchMonitor,
    Monitor,
    Trainee,
    Unavailable,
    Workload,
    add_common_arguments,
    markdown_table,
)

WORKLOADS = {workload.name: workload for workload in (REFERENCE, MANY_SMALL)}
VARIANTS = {variant.name: variant for variant in (BARE, PROBE, DEFAULT, HISTOGRAMS, HANDWRITTEN)}
WINDOWS = (100, 1000, 10_000)
SETTLE_STEPS = 10
PRELOADED = (
    "gradwatch",
    "gradwatch.sinks.tensorboard",
    "gradwatch.engine.histograms",
    "gradwatch.engine.activations",
    "torch.utils.tensorboard",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
)
IMPORTS_ONLY = "imports only (TensorBoard, matplotlib, gradwatch)"


def preload() -> None:
    """Imports every library a variant may import, so that its cost is not counted as data."""
    for name in PRELOADED:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _probe_with_window(window: int) -> Callable[[Trainee, Path], Monitor]:
    return lambda trainee, workdir: GradWatchMonitor(trainee, detectors=(), window=window)


def measure_in_child(
    workload: Workload, make: Callable[[Trainee, Path], Monitor], steps: int, imports_only: bool
) -> dict:
    """Runs in the child process: peak RSS growth and tracemalloc peak caused by the monitor.

    With ``imports_only`` the libraries are imported after the baseline and the steps are bare.
    """
    if not imports_only:
        preload()
    trainee = workload.instantiate(torch.device("cpu"))
    for _ in range(SETTLE_STEPS):
        trainee.forward_backward()
        trainee.finish(False)
    before_kb, before_peak_kb = current_rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    if imports_only:
        preload()
    with tempfile.TemporaryDirectory() as tmp:
        monitor = make(trainee, Path(tmp))
        for _ in range(steps):
            loss = trainee.forward_backward()
            trainee.finish(monitor.after_backward(loss))
        after_kb, after_peak_kb = (
            current_rss_kb(),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        )
        _, python_peak = tracemalloc.get_traced_memory()
        monitor.close()
    return {
        "rss_growth_kb": after_kb - before_kb,
        "peak_growth_kb": after_peak_kb - before_peak_kb,
        "python_peak_bytes": python_peak,
    }


def current_rss_kb() -> int:
    """Resident set size now, in KiB (Linux ``/proc/self/status``; peak RSS elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _run_child(workload: str, variant: str, window: int, steps: int, threads: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--workload",
        workload,
        "--variant",
        variant,
        "--window",
        str(window),
        "--steps",
        str(steps),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mb(kilobytes: float) -> str:
    return f"{kilobytes / 1024:.1f}"


def run(quick: bool, threads: int) -> str:
    """Both tables; returns Markdown."""
    steps = 60 if quick else 300
    bare = _run_child(REFERENCE.name, BARE.name, 0, steps, threads)
    rows = []
    for name in (*VARIANTS, IMPORTS_ONLY):
        result = bare if name == BARE.name else _run_child(REFERENCE.name, name, 0, steps, threads)
        if "error" in result:
            rows.append([name, "-", "-", result["error"]])
            continue
        extra = result["rss_growth_kb"] - bare.get("rss_growth_kb", 0)
        extra_peak = result["peak_growth_kb"] - bare.get("peak_growth_kb", 0)
        rows.append(
            [
                name,
                _mb(result["rss_growth_kb"]),
                _mb(extra),
                _mb(extra_peak),
                _mb(result["python_peak_bytes"] / 1024),
            ]
        )
    header = [
        "variant",
        "RSS growth MB",
        "minus bare MB",
        "peak RSS growth minus bare MB",
        "Python peak MB (tracemalloc)",
    ]
    reference_table = markdown_table(header, rows)

    layers = len(next(iter(MANY_SMALL.build_model().children())))
    bare_small = _run_child(MANY_SMALL.name, BARE.name, 0, steps, threads)
    window_rows = []
    for window in WINDOWS:
        result = _run_child(MANY_SMALL.name, "probe-window", window, steps, threads)
        if "error" in result:
            window_rows.append([str(window), "-", "-", "-", result["error"]])
            continue
        ring_kb = window * (layers + 2) * 4 / 1024
        mirror_kb = min(window, steps) * (layers + 3) * 4 / 1024
        extra = result["rss_growth_kb"] - bare_small.get("rss_growth_kb", 0)
        window_rows.append(
            [
                str(window),
                _mb(ring_kb),
                _mb(mirror_kb),
                _mb(extra),
                _mb(result["python_peak_bytes"] / 1024),
            ]
        )
    window_header = [
        "window",
        "device ring MB (expected)",
        f"host mirror after {steps} steps MB (expected)",
        "RSS growth minus bare MB",
        "Python peak MB",
    ]
    return (
        f"**Memory, reference MLP** ({steps} monitored steps after {SETTLE_STEPS} bare ones; "
        "a copy of the gradients would be 24.2 MB)\n\n"
        + reference_table
        + f"\n\n**Memory vs window, probe on the 1,000-tensor model** ({layers} layers, {steps} "
        "steps)\n\n" + markdown_table(window_header, window_rows)
    )


def _child_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    if args.variant == "probe-window":
        make = _probe_with_window(args.window)
    elif args.variant == IMPORTS_ONLY:
        make = BARE.make
    else:
        make = VARIANTS[args.variant].make
    try:
        result = measure_in_child(workload, make, args.steps, args.variant == IMPORTS_ONLY)
    except Unavailable as reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``--child`` is the per-variant subprocess)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default=REFERENCE.name, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=BARE.name, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=60, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child_main(args)
    print(run(args.quick, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
