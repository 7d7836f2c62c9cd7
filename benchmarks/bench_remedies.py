"""What remedies cost on top of monitoring, paired, with a fused and with a non-fused AdamW.

Run ``python benchmarks/bench_remedies.py [--quick] [--rounds N] [--threads 1]``. Two paired runs on
the reference workload (``common.REFERENCE``): every variant with ``AdamW(fused=True)``
(``common.FUSED_VARIANTS``: clipping and skipping inside the optimizer's kernel), then every variant
with the default AdamW (``common.EXPLICIT_VARIANTS``: the explicit path). Besides the usual columns
(see ``common.py``), each table gives the points over gradwatch's default monitoring (per-step
median and amortised) and over ``torch.nn.utils.clip_grad_norm_`` measured in the same run. The
target (the remedies issue): default + ``[ZClip(), SkipStep()]`` with a fused optimizer at most
1 point above default monitoring, median and amortised, and below ``clip_grad_norm_``. On CUDA
(``--device cuda``) the host synchronisations per step are counted too (target: 0 for clip + skip
with a fused optimizer).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    CLIP_GRAD_NORM,
    CLIP_SKIP,
    DEFAULT,
    EXPLICIT_VARIANTS,
    FLOOR,
    FUSED_VARIANTS,
    REFERENCE,
    PairedResult,
    Variant,
    add_common_arguments,
    amortised_percent,
    amortised_points_over,
    count_host_syncs,
    machine_description,
    markdown_table,
    overhead_percent,
    points_over,
    run_paired,
)

QUICK = {"rounds": 20, "warmup": 3}
FULL = {"rounds": 600, "warmup": 30}
TARGET_PP = 1.0


def remedies_table(result: PairedResult, title: str) -> str:
    """One Markdown table: every variant against the bare step, default monitoring and
    ``clip_grad_norm_``."""
    bare = result.bare
    default = result.times_of(DEFAULT.name)
    clip = result.times_of(CLIP_GRAD_NORM.name)
    floor = result.times_of(FLOOR.name)
    bare_ms = sorted(bare)[len(bare) // 2] * 1e3
    rows = []
    for entry in result.results[1:]:
        if entry.skipped is not None:
            rows.append([entry.variant.name, f"skipped: {entry.skipped}", *[""] * 6])
            continue
        times = entry.times
        q1, median, q3 = overhead_percent(times, bare)
        over_default = points_over(times, default, bare)
        over_default_amortised = amortised_points_over(times, default, bare)
        over_clip = points_over(times, clip, bare)
        verdict = ""
        if entry.variant.name == CLIP_SKIP.name:
            met = max(over_default, over_default_amortised) <= TARGET_PP and over_clip < 0
            verdict = f"≤ {TARGET_PP} pp over default and below clip_grad_norm_: " + (
                "met" if met else "NOT met"
            )
        if entry.warnings:
            verdict += f" warnings: {'; '.join(entry.warnings)}"
        rows.append(
            [
                entry.variant.name,
                f"{median:+.2f}%",
                f"[{q1:+.2f}, {q3:+.2f}]",
                f"{amortised_percent(times, bare):+.2f}%",
                f"{points_over(times, floor, bare):+.2f}",
                f"{over_default:+.2f} / {over_default_amortised:+.2f}",
                f"{over_clip:+.2f}",
                verdict.strip(),
            ]
        )
    header = [
        "variant",
        "overhead (median)",
        "IQR",
        "amortised",
        "pp over floor",
        "pp over default (median / amortised)",
        "pp over clip_grad_norm_",
        "target",
    ]
    return (
        f"**{title}** ({REFERENCE.description}; {result.device}, {result.rounds} paired rounds; "
        f"bare step {bare_ms:.2f} ms)\n\n" + markdown_table(header, rows)
    )


def sync_table(workdir: Path, steps: int) -> str:
    """Host syncs per step on CUDA, the optimizer step included (remedies act there)."""
    rows = []
    for variant in FUSED_VARIANTS[2:] + EXPLICIT_VARIANTS[3:]:
        label = variant.name + (" (fused)" if variant.optimizer.get("fused") else "")
        try:
            per_step = count_host_syncs(REFERENCE, variant, workdir, steps=steps, warmup=5)
        except Exception as error:
            rows.append([label, f"not measured: {error}"])
            continue
        rows.append([label, f"{per_step:.3f}"])
    return "**Host syncs per step on CUDA** (reference MLP)\n\n" + markdown_table(
        ["variant", "syncs / step"], rows
    )


def run(
    quick: bool, device: torch.device, workdir: Path, rounds: int | None, only: str | None
) -> str:
    """The paired runs; returns Markdown."""
    settings = dict(QUICK if quick else FULL)
    if rounds is not None:
        settings["rounds"] = rounds
    runs: list[tuple[str, tuple[Variant, ...], str]] = [
        ("fused", FUSED_VARIANTS, "Remedies with AdamW(fused=True)"),
        ("explicit", EXPLICIT_VARIANTS, "Remedies with the default AdamW (explicit path)"),
    ]
    sections = [f"- machine: {machine_description()}"]
    for name, variants, title in runs:
        if only is not None and name != only:
            continue
        result = run_paired(REFERENCE, variants, workdir / name, device=device, **settings)
        sections.append(remedies_table(result, title))
    if device.type == "cuda":
        sections.append(sync_table(workdir / "syncs", steps=20 if quick else 200))
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds (default 600)")
    parser.add_argument("--only", choices=("fused", "explicit"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        print(run(args.quick, torch.device(args.device), Path(tmp), args.rounds, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
