"""Cost of gradwatch's gradient histograms and TensorBoard writes against the usual routes.

Run ``python benchmarks/bench_histograms.py [--layers 8] [--width 512] [--repeats 10]``.

1. Histograms, on the same gradient tensors (one histogram per layer of an MLP):
   ``SummaryWriter.add_histogram`` (host copy, numpy binning over ~1,500 edges) against gradwatch's
   ``GradientHistograms.compute`` (device binning) + the one host transfer + ``decode`` +
   ``add_histogram_raw``.
2. Per-step scalars of one flush (total norm, clip coefficient and LR scale every step; gradient
   and weight norm per layer at the last step): one ``add_scalar`` per value against the sink's
   batched ``Summary`` protos (one event per step), and what ``TensorBoardSink.write`` costs the
   training thread when the writing runs in the background.

Times are medians over ``--repeats`` runs, in milliseconds, measured in one process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch as gw
from gradwatch.engine.records import FlushRecord
from gradwatch.engine.transfer import to_host
from gradwatch.sinks.events import write_protos as _write_protos
from gradwatch.sinks.tensorboard import TensorBoardSink


def median_ms(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_histograms(layers: int, width: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, optimizer, histogram_every_n_steps=1, log_every_n_steps=10**6)
    model(torch.randn(64, width)).pow(2).mean().backward()
    watch.step()
    histograms = watch.engine.histograms
    assert histograms is not None
    numel = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        names = watch.layer_names
        per_layer = {
            name: torch.cat([p.grad.reshape(-1) for p in module.parameters()])
            for name, module in model.named_children()
        }

        def torch_route() -> None:
            for name in names:
                writer.add_histogram(f"h/{name}", per_layer[name], 0)

        probe = watch.engine.probe
        pattern = probe.grad_pattern()
        sq_norms, _ = probe.grad_sq_norms(pattern)
        params, grads = probe.grads(pattern)

        def gradwatch_route() -> None:
            (host,) = to_host([histograms.compute(params, grads, sq_norms)])
            for name, kwargs in histograms.decode(host):
                writer.add_histogram_raw(f"g/{name}", global_step=0, **kwargs)

        def compute_only() -> None:
            histograms.compute(params, grads, sq_norms)

        baseline = median_ms(torch_route, repeats)
        ours = median_ms(gradwatch_route, repeats)
        device_part = median_ms(compute_only, repeats)
        writer.close()
    print(f"## Histograms: {layers} layers x Linear({width}), {numel / 1e6:.2f} M gradient values")
    print("| route | ms per histogram step |")
    print("|---|---|")
    print(f"| SummaryWriter.add_histogram per layer | {baseline:.1f} |")
    print(f"| gradwatch: compute + transfer + decode + add_histogram_raw | {ours:.1f} |")
    print(f"| (of which compute on the device) | {device_part:.1f} |")
    print(f"speed-up: {baseline / ours:.1f}x\n")
    watch.close()


def bench_scalars(layers: int, steps: int, repeats: int, max_queue: int) -> None:
    rng = np.random.default_rng(0)
    names = [f"blocks.{i}" for i in range(layers)]
    record = FlushRecord(
        layer_names=names,
        steps=np.arange(steps),
        grad_norms=rng.random((steps, layers), dtype=np.float32),
        total_norms=rng.random(steps, dtype=np.float32),
        clip_coefs=rng.random(steps, dtype=np.float32),
        lr_scales=np.ones(steps, dtype=np.float32),
        weight_norms=rng.random(layers, dtype=np.float32),
        update_ratios=None,
    )
    values = 3 * steps + 2 * layers
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir, max_queue=max_queue)

        def one_add_scalar_per_value() -> None:
            for i, step in enumerate(record.steps.tolist()):
                writer.add_scalar("gradwatch/grad_norm_total", float(record.total_norms[i]), step)
                writer.add_scalar("gradwatch/clip_coef", float(record.clip_coefs[i]), step)
                writer.add_scalar("gradwatch/lr_scale", float(record.lr_scales[i]), step)
            last = int(record.steps[-1])
            for j, name in enumerate(names):
                writer.add_scalar(
                    f"gradwatch/grad_norm/{name}", float(record.grad_norms[-1, j]), last
                )
                writer.add_scalar(
                    f"gradwatch/weight_norm/{name}", float(record.weight_norms[j]), last
                )

        file_writer = writer._get_file_writer()
        sink = TensorBoardSink(writer=writer, background=False)

        def batched_protos() -> None:  # the sink's own path, without the gradient-flow image
            _write_protos(file_writer, sink._events(record))

        naive = median_ms(one_add_scalar_per_value, repeats)
        batched = median_ms(batched_protos, repeats)
        writer.close()
    with tempfile.TemporaryDirectory() as logdir:
        sink = TensorBoardSink(logdir, image_interval=1e9)
        enqueue = median_ms(lambda: sink.write(record), repeats)
        sink.close()
    print(
        f"## Scalars of one flush: {steps} steps, {layers} layers ({values} values), "
        f"SummaryWriter(max_queue={max_queue})"
    )
    print("| route | ms per flush | µs per value |")
    print("|---|---|---|")
    rows = [
        ("one add_scalar per value", naive),
        ("batched Summary protos (one event per step)", batched),
        ("TensorBoardSink.write on the training thread (background writer)", enqueue),
    ]
    for label, milliseconds in rows:
        print(f"| {label} | {milliseconds:.3f} | {1e3 * milliseconds / values:.2f} |")
    print(f"speed-up of batching: {naive / batched:.1f}x\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="steps per flush (scalar benchmark)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_histograms(args.layers, args.width, args.repeats)
    for max_queue in (10, 1024):  # SummaryWriter's default, and what TensorBoardSink(logdir) uses
        bench_scalars(3 * args.layers, args.steps, args.repeats, max_queue)


if __name__ == "__main__":
    main()
