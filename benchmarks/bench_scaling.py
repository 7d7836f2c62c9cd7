"""How the cost of ``watch.step()`` (``detectors=()``) grows with the number and size of tensors.

Run ``python benchmarks/bench_scaling.py [--quick]``. Each configuration is a residual stack of
``k`` Linear(w, w) layers (``2k`` parameter tensors, ``k (w² + w)`` elements) trained with AdamW
on batch 64; the bare step, the floor (one ``torch._foreach_norm``) and the probe alternate step
by step (see ``common.py``). Two sweeps: the tensor count at a fixed total size (about 1M
elements), and the total size at a fixed count (100 tensors). The absolute µs per step show how
the work itself grows; the percentages relate it to a step of that model.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    BARE,
    FLOOR,
    PROBE,
    ResidualStack,
    Workload,
    add_common_arguments,
    extra_microseconds,
    markdown_table,
    points_over,
    quantiles,
    run_paired,
)

FIXED_SIZE = 1 << 20
COUNTS = (10, 100, 1000, 2000)
FIXED_COUNT = 100
SIZES = (100_000, 1_000_000, 8_000_000)
QUICK = {"rounds": 15, "warmup": 3}
FULL = {"rounds": 300, "warmup": 20}


def stack_workload(tensors: int, elements: int) -> Workload:
    """A residual stack with ``tensors`` parameter tensors and about ``elements`` elements."""
    depth = tensors // 2
    width = max(2, round(math.sqrt(elements / depth)))
    return Workload(
        name=f"{tensors} tensors / {depth * (width * width + width):,} elements",
        description=f"{depth} x residual [Linear({width}, {width}), tanh]",
        build_model=lambda: ResidualStack(depth, width),
        input_shape=(64, width),
        output_dim=width,
    )


def scaling_rows(
    workloads: list[Workload], workdir: Path, settings: dict[str, int]
) -> list[list[str]]:
    """One table row per workload: bare step, floor and probe costs."""
    rows = []
    for workload in workloads:
        result = run_paired(workload, (BARE, FLOOR, PROBE), workdir, **settings)
        bare = result.bare
        floor, probe = result.times_of(FLOOR.name), result.times_of(PROBE.name)
        _, bare_median, _ = quantiles(bare)
        probe_us = extra_microseconds(probe, bare)
        floor_us = extra_microseconds(floor, bare)
        rows.append(
            [
                workload.name,
                f"{bare_median * 1e3:.1f}",
                f"{floor_us:.0f}",
                f"{probe_us:.0f}",
                f"{extra_microseconds(probe, floor):.0f}",
                f"{floor_us / (bare_median * 1e6) * 100:.2f}%",
                f"{points_over(probe, floor, bare):+.2f}",
            ]
        )
    return rows


def run(quick: bool, workdir: Path) -> str:
    """Both sweeps; returns Markdown."""
    settings = QUICK if quick else FULL
    header = [
        "configuration",
        "bare step ms",
        "floor µs/step",
        "probe µs/step",
        "probe − floor µs",
        "floor % of step",
        "probe pp over floor",
    ]
    by_count = scaling_rows([stack_workload(n, FIXED_SIZE) for n in COUNTS], workdir, settings)
    by_size = scaling_rows([stack_workload(FIXED_COUNT, s) for s in SIZES], workdir, settings)
    return (
        f"**Scaling with the number of tensors** (total ≈ {FIXED_SIZE:,} elements)\n\n"
        + markdown_table(header, by_count)
        + f"\n\n**Scaling with the total size** ({FIXED_COUNT} tensors)\n\n"
        + markdown_table(header, by_size)
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        print(run(args.quick, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
