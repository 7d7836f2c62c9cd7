"""Monitoring at the floor: gradwatch's distance to one gradient read, over several 200-step runs.

Each run is a fresh paired run (``common.run_paired``) of the reference workload with the bare
step, the floor (one ``torch._foreach_norm`` over the gradients after backward), the probe alone,
default gradwatch with TensorBoard, and norms taken in post-accumulate-grad hooks while each
gradient is still in cache (the "hot" read, a candidate for beating the floor). Every run
reports, in points of the bare step, the median per-step distance to the floor and the amortised
one (the run's 200 steps summed: the flushes and the writer thread included). The table gives
every run and the spread over runs, for each thread count.

Usage::

    python benchmarks/bench_floor.py --runs 5 --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    BARE,
    DEFAULT,
    FLOOR,
    PROBE,
    REFERENCE,
    Trainee,
    Variant,
    amortised_points_over,
    machine_description,
    markdown_table,
    points_over,
    run_paired,
)
from torch import nn

from gradwatch.engine.records import FlushRecord


class HotNorms:
    """Per-tensor gradient norms written by post-accumulate-grad hooks during backward.

    Each hook reads one gradient right after autograd accumulated it (still in cache) into a slot
    of a ``[P]`` buffer; after backward only a stack-free square and sum remain. The same numbers
    as the floor's pass when there is one backward per step, no AMP scale in the gradients and no
    change to them after backward (see the README's performance section).
    """

    def __init__(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        self.norms = torch.zeros(len(params))
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(index))
            for index, p in enumerate(params)
        ]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        slot = self.norms[index]

        def record(param: torch.Tensor) -> None:
            torch.linalg.vector_norm(param.grad, out=slot)

        return record

    def after_backward(self, loss: torch.Tensor) -> bool:
        self.total = self.norms.square().sum()
        return False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


HOT = Variant("hot norms (post-accumulate-grad hooks)", lambda trainee, workdir: _hot(trainee))


def _hot(trainee: Trainee) -> HotNorms:
    return HotNorms(trainee.model)


VARIANTS = (BARE, FLOOR, PROBE, DEFAULT, HOT)


def one_run(rounds: int, warmup: int) -> dict[str, tuple[float, float]]:
    """One paired run: per variant, (median pp over the floor, amortised pp over the floor)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = run_paired(REFERENCE, VARIANTS, Path(tmp), rounds=rounds, warmup=warmup)
    floor, bare = result.times_of(FLOOR.name), result.bare
    out = {}
    for variant in VARIANTS[2:]:
        times = result.times_of(variant.name)
        amortised = amortised_points_over(times, floor, bare) if len(times) >= rounds else 0.0
        out[variant.name] = (points_over(times, floor, bare), amortised)
    out["bare step ms"] = (statistics.median(bare) * 1e3, 0.0)
    return out


def profile(steps: int) -> str:
    """CPU time (``time.thread_time``, so other processes do not count) of each part of default
    gradwatch with TensorBoard: the step, the flush step, and the writer thread's work."""
    import gradwatch as gw
    from gradwatch.sinks.base import Sink
    from gradwatch.sinks.tensorboard import TensorBoardSink

    records = []

    class Keep(Sink):
        def write(self, record: FlushRecord) -> None:
            records.append(record)

    trainee = REFERENCE.instantiate(torch.device("cpu"))
    watch = gw.GradWatch(trainee.model, trainee.optimizer, sinks=[Keep()])
    floor_t, step_t, flush_t = [], [], []
    cadence = watch.engine.config.log_every_n_steps
    for index in range(steps):
        loss = trainee.forward_backward()
        start = time.thread_time()
        torch.stack(torch._foreach_norm([p.grad for p in trainee.model.parameters()]))
        middle = time.thread_time()
        watch.step(loss)
        end = time.thread_time()
        trainee.finish(False)
        if index >= 10:
            floor_t.append(middle - start)
            (flush_t if (index + 1) % cadence == 0 else step_t).append(end - middle)
    watch.close()
    with tempfile.TemporaryDirectory() as tmp:
        sink = TensorBoardSink(tmp, background=False, image_interval=1e9)
        proto_t, image_t = [], []
        for record in records:
            start = time.thread_time()
            sink._write_guarded(record)
            proto_t.append(time.thread_time() - start)
        for _ in range(3):
            start = time.thread_time()
            sink._flow.render(sink._flow_names, sink._plot, sink._flow_range)
            image_t.append(time.thread_time() - start)
        sink.close()
    median = statistics.median
    every = f"every {cadence} steps"
    rows = [
        ["floor: `_foreach_norm` + stack", "every step", f"{median(floor_t) * 1e3:.3f}"],
        ["`watch.step()` (default detectors)", "every step", f"{median(step_t) * 1e3:.3f}"],
        ["`watch.step()` with the flush", every, f"{median(flush_t) * 1e3:.3f}"],
        ["writer thread: one flush record", every, f"{median(proto_t) * 1e3:.3f}"],
        ["writer thread: flow image", "at most every 30 s", f"{median(image_t) * 1e3:.1f}"],
    ]
    return markdown_table(["part", "how often", "CPU ms"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="independent paired runs per setting")
    parser.add_argument("--rounds", type=int, default=200, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--profile", action="store_true", help="also the CPU time of each part")
    args = parser.parse_args(argv)
    print(f"Machine: {machine_description()}\n")
    if args.profile:
        torch.set_num_threads(1)
        print("### CPU time of each part (1 thread, reference workload, medians)\n")
        print(profile(max(args.rounds, 160)) + "\n", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs = [one_run(args.rounds, args.warmup) for _ in range(args.runs)]
        names = [v.name for v in VARIANTS[2:]]
        header = ["run", "bare step"] + [f"{n}: median / amortised" for n in names]
        rows = [
            [str(i + 1), f"{run['bare step ms'][0]:.1f} ms"]
            + [f"{run[n][0]:+.2f} / {run[n][1]:+.2f}" for n in names]
            for i, run in enumerate(runs)
        ]
        for label, pick in (("min", min), ("median", statistics.median), ("max", max)):
            rows.append(
                [f"**{label}**", ""]
                + [
                    f"{pick(r[n][0] for r in runs):+.2f} / {pick(r[n][1] for r in runs):+.2f}"
                    for n in names
                ]
            )
        print(
            f"### {threads} thread(s): points of the bare step above the floor, "
            f"{args.runs} runs x {args.rounds} steps\n"
        )
        print(markdown_table(header, rows) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
