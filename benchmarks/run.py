"""Runs every gradwatch benchmark and prints one Markdown report.

Usage::

    python benchmarks/run.py                  # the full run behind RESULTS.md (~1 h, quiet)
    python benchmarks/run.py --quick          # smoke run: every code path, noisy numbers (minutes)
    python benchmarks/run.py --only overhead scaling --output report.md

Sections: the distance to the floor over several 200-step runs, 1 and 2 threads, with the CPU
time of each part (``bench_floor.py``), paired overhead on three workloads (``bench_overhead.py``),
the cost of remedies with a fused and a non-fused optimizer (``bench_remedies.py``), where
``watch.step()`` spends its time (cProfile), scaling with tensor count and size
(``bench_scaling.py``), memory (``bench_memory.py``), and, when present, histograms
(``bench_histograms.py``), distributed (``bench_distributed.py``) and slow or hung writers
(``bench_writer.py``), which run as subprocesses with their own command lines. On a machine
with CUDA the same command reports GPU overhead and host syncs per step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_memory
import bench_overhead
import bench_remedies
import bench_scaling
import torch
from common import add_common_arguments, machine_description

HERE = Path(__file__).resolve().parent
SECTIONS = (
    "floor",
    "overhead",
    "remedies",
    "profile",
    "scaling",
    "memory",
    "histograms",
    "distributed",
    "writers",
)
# Command lines of the benchmarks that have their own (quick, full).
EXTERNAL = {
    "floor": (
        "bench_floor.py",
        ["--runs", "1", "--rounds", "40", "--threads", "1"],
        ["--runs", "5", "--profile"],
    ),
    "histograms": ("bench_histograms.py", ["--repeats", "3"], []),
    "writers": ("bench_writer.py", ["--steps", "60", "--log-every", "1"], ["--log-every", "1"]),
    "distributed": ("bench_distributed.py", ["--pairs", "20", "--warmup", "5"], []),
}


def external_section(name: str, quick: bool, threads: int) -> str:
    """Runs another engineer's benchmark script and returns its output as Markdown."""
    script, quick_args, full_args = EXTERNAL[name]
    path = HERE / script
    if not path.exists():
        return f"*{script} is not present: skipped.*"
    command = [sys.executable, str(path), *(quick_args if quick else full_args)]
    if name == "histograms":
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=HERE)
    output = done.stdout.strip()
    if done.returncode != 0:
        error = done.stderr.strip().splitlines()[-1:] or ["no message"]
        return f"*{script} failed (exit {done.returncode}): {error[0]}*\n\n{output}"
    if output.startswith(("{", "[")):
        return f"```json\n{output}\n```"
    return output


def report(sections: list[str], quick: bool, threads: int, device: torch.device) -> str:
    """Runs the chosen sections; returns the whole Markdown report."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for section in sections:
            print(f"== {section}", file=sys.stderr, flush=True)
            if section == "overhead":
                body = bench_overhead.run(quick, device, workdir)
            elif section == "remedies":
                body = bench_remedies.run(quick, device, workdir, None, None)
            elif section == "profile":
                body = bench_overhead.profile_probe(50 if quick else 200, device)
            elif section == "scaling":
                body = bench_scaling.run(quick, workdir)
            elif section == "memory":
                body = bench_memory.run(quick, threads)
            else:
                body = external_section(section, quick, threads)
            parts.append(f"### {section}\n\n{body}")
    header = (
        f"## gradwatch benchmarks ({'--quick smoke run' if quick else 'full run'})\n\n"
        f"- machine: {machine_description()}\n"
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}, "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
        f"{time.perf_counter() - started:.0f} s in total\n"
        f"- device: {device}"
    )
    return "\n\n".join([header, *parts]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = report(args.only, args.quick, args.threads, torch.device(args.device))
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
