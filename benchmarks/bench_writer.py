"""What a slow or hung TensorBoard writer costs the training loop.

Run ``python benchmarks/bench_writer.py [--steps 400] [--log-every 10] [--delay-ms 20]``.

Four copies of one small MLP train side by side in one process, each with its own watch; they take
turns step by step, so background load hits them alike. Their watches differ only in the writer
behind the ``TensorBoardSink``: none, a real ``SummaryWriter``, a writer-like object that sleeps
``--delay-ms`` in every ``add_*`` call, and one whose ``add_*`` calls never return. The table gives
each copy's median, mean and worst step time (forward, backward, ``watch.step()``, optimizer
step), as the training loop sees it, and the records its sink dropped; ``close()`` is timed
separately (a hung writer is abandoned after ``close_timeout``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradwatch as gw
from gradwatch.sinks.tensorboard import TensorBoardSink


class DelayedWriter:
    """A writer-like object whose ``add_*`` calls take ``delay`` seconds, or never return."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.calls = 0
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not name.startswith("add_"):
            raise AttributeError(name)

        def add(*args: Any, **kwargs: Any) -> None:
            if self.delay is None:
                self.release.wait()
            else:
                time.sleep(self.delay)
            self.calls += 1

        return add


def mlp(depth: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10, help="rounds left out of the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    logdir = tempfile.mkdtemp(prefix="bench_writer_")
    writers: dict[str, Any] = {
        "no writer": None,
        "SummaryWriter": "logdir",
        f"slow writer ({args.delay_ms:g} ms per add_*)": DelayedWriter(args.delay_ms / 1e3),
        "hung writer (add_* never returns)": DelayedWriter(None),
    }
    runs = []
    for name, writer in writers.items():
        model = mlp(args.depth, args.width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if writer is None:
            sinks = []
        elif writer == "logdir":
            sinks = [TensorBoardSink(f"{logdir}/{len(runs)}")]
        else:
            sinks = [TensorBoardSink(writer=writer, close_timeout=1.0)]
        watch = gw.GradWatch(model, optimizer, log_every_n_steps=args.log_every, sinks=sinks)
        runs.append((name, model, optimizer, watch, sinks, []))
    batch = torch.randn(64, args.width), torch.randn(64, 1)
    for round_index in range(args.steps):
        order = runs[round_index % len(runs) :] + runs[: round_index % len(runs)]
        for _, model, optimizer, watch, _, times in order:
            start = time.perf_counter()
            loss = nn.functional.mse_loss(model(batch[0]), batch[1])
            loss.backward()
            watch.step(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
            if round_index >= args.warmup:
                times.append(time.perf_counter() - start)
    print(
        f"## Writers: {args.depth} x Linear({args.width}) + GELU, batch 64, AdamW, "
        f"{args.threads} thread(s), log_every_n_steps={args.log_every}, {args.steps} steps\n"
    )
    print(
        "| writer | median step ms | mean step ms | worst step ms | dropped records | close() s |"
    )
    print("|---|---|---|---|---|---|")
    for name, _, _, watch, sinks, times in runs:
        start = time.perf_counter()
        watch.close()
        closing = time.perf_counter() - start
        median = statistics.median(times)
        dropped = sum(sink.dropped for sink in sinks)
        print(
            f"| {name} | {1e3 * median:.2f} | {1e3 * statistics.fmean(times):.2f} | "
            f"{1e3 * max(times):.1f} | "
            f"{dropped} | {closing:.2f} |"
        )
    for writer in writers.values():
        if isinstance(writer, DelayedWriter):
            writer.release.set()


if __name__ == "__main__":
    main()
