"""Communication overhead of gradwatch under FSDP2: two gloo CPU processes, paired step by step.

Each iteration runs two training steps of the same FSDP2 model, one plain and one with
``GradWatch.step()`` (order alternating, so drift cancels), each timed on rank 0 between barriers.
The per-step overhead is the median of the paired differences. Separately it times
``GradWatch.step()`` itself and one ``all_reduce`` of ``layers`` float32 values, the collective
gradwatch adds per step.

Usage:
    python benchmarks/bench_distributed.py [--pairs 200] [--layers 16] [--width 256]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradwatch as gw

WORLD_SIZE = 2


def _mlp(layers: int, width: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    blocks.append(nn.Linear(width, 1))
    return nn.Sequential(*blocks)


def _quantiles(values: list[float]) -> dict[str, float]:
    """Median, quartiles and mean in microseconds."""
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {
        "median_us": median * 1e6,
        "q1_us": q1 * 1e6,
        "q3_us": q3 * 1e6,
        "mean_us": statistics.fmean(values) * 1e6,
    }


def _timed_all_reduce(num_values: int, repeats: int) -> list[float]:
    buffer = torch.zeros(num_values)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two processes on a two-core machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = _mlp(args.layers, args.width)
    for block in model:
        if isinstance(block, nn.Linear):
            fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, optimizer, log_every_n_steps=args.log_every)
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(args.batch, args.width, generator=generator)

    def train_step(watched: bool) -> tuple[float, float]:
        dist.barrier()
        start = time.perf_counter()
        model(inputs).pow(2).mean().backward()
        watch_start = time.perf_counter()
        if watched:
            watch.step()
        watch_time = time.perf_counter() - watch_start
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        return time.perf_counter() - start, watch_time

    for i in range(args.warmup):
        train_step(watched=i % 2 == 0)
    plain, watched, differences, watch_calls = [], [], [], []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {}
        for flag in order:
            times[flag], watch_time = train_step(watched=flag)
            if flag:
                watch_calls.append(watch_time)
        plain.append(times[False])
        watched.append(times[True])
        differences.append(times[True] - times[False])
    all_reduce = _timed_all_reduce(len(watch.layer_names), args.pairs)
    watch.close()
    if rank == 0:
        queue.put(
            {
                "layers": len(watch.layer_names),
                "parameters": sum(p.numel() for p in model.parameters()),
                "step_plain": _quantiles(plain),
                "step_with_gradwatch": _quantiles(watched),
                "paired_overhead": _quantiles(differences),
                "watch_step_call": _quantiles(watch_calls),
                "all_reduce_of_layers_floats": _quantiles(all_reduce),
            }
        )
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="paired iterations (2 steps each)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--layers", type=int, default=16, help="Linear layers in the MLP")
    parser.add_argument("--width", type=int, default=256, help="MLP width")
    parser.add_argument("--batch", type=int, default=32, help="batch size per rank")
    parser.add_argument("--log-every", type=int, default=50, help="GradWatch log_every_n_steps")
    args = parser.parse_args()

    load_before = os.getloadavg()
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = mp.start_processes(
        _worker,
        args=(_free_port(), args, queue),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    result = queue.get(timeout=600)
    while not processes.join(timeout=60):
        pass
    result["load_average_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    result["cpu_count"] = os.cpu_count()
    result["torch"] = torch.__version__
    result["config"] = vars(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
