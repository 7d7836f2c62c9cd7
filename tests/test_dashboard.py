"""The real TensorBoard server serves what gradwatch wrote (checked through its HTTP data API)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch as gw

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
    with gw.GradWatch(model, logdir=root / "run", log_every_n_steps=4, detectors=()) as watch:
        x = torch.randn(16, 4)
        for _ in range(12):
            model(x).pow(2).mean().backward()
            watch.step()
            model.zero_grad()
    return root


@pytest.fixture(scope="module")
def server(logdir: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                error = process.stderr.read().decode(errors="replace") if process.stderr else ""
                pytest.skip(f"tensorboard exited at start-up: {error[-300:]}")
            try:
                if "run" in get_json(base, "/data/plugin/scalars/tags"):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                pytest.skip(f"tensorboard did not serve the run within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def test_scalar_tags_are_served(server: str) -> None:
    tags = get_json(server, "/data/plugin/scalars/tags")["run"]
    assert {
        "gradwatch/grad_norm_total",
        "gradwatch/grad_norm/0",
        "gradwatch/grad_norm/2",
        "gradwatch/weight_norm/0",
    } <= set(tags)
    points = get_json(server, "/data/plugin/scalars/scalars?run=run&tag=gradwatch/grad_norm_total")
    assert [point[1] for point in points] == list(range(12))


def test_custom_scalars_layout_is_served(server: str) -> None:
    layout = get_json(server, "/data/plugin/custom_scalars/layout")
    titles = {chart["title"] for category in layout["category"] for chart in category["chart"]}
    assert "gradient norm per layer" in titles
    assert "total gradient norm, clip coefficient, LR scale" in titles


def test_gradient_flow_image_is_served(server: str) -> None:
    tags = get_json(server, "/data/plugin/images/tags")
    assert "gradwatch/gradient_flow" in tags["run"]
