"""The dashboard: what the real TensorBoard server serves (its HTTP data API), the tags and layout
the README screenshots rely on (read back with ``EventAccumulator``, always checked), and the
screenshots themselves in headless Chromium (skipped where Chromium is not installed)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

import gradwatch as gw
from gradwatch.demo import SCENARIOS, run_scenario
from gradwatch.sinks.flow import NONFINITE_COLOUR, WIDTH_PX

STARTUP_TIMEOUT_S = 90.0
DEMO_STEPS = 60
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dashboard_screenshots.py"


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
    assert "total gradient norm (before remedies)" in titles
    assert any(title.startswith("log10 gradient norm") for title in titles)


def test_gradient_flow_image_is_served(server: str) -> None:
    tags = get_json(server, "/data/plugin/images/tags")
    assert "gradwatch/gradient_flow" in tags["run"]


# ------------------------------------------------------------------------ the README screenshots


def screenshots_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard_screenshots", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's runs, as ``scripts/dashboard_screenshots.py`` trains them (shorter)."""
    root = tmp_path_factory.mktemp("demo")
    with open(os.devnull, "w") as quiet:
        for name in SCENARIOS:
            run_scenario(name, root, steps=DEMO_STEPS, out=quiet)
    return root


def run_events(demo_logdir: Path, name: str) -> ea.EventAccumulator:
    guidance = {ea.SCALARS: 0, ea.TENSORS: 0, ea.IMAGES: 0}
    return ea.EventAccumulator(str(demo_logdir / name), size_guidance=guidance).Reload()


def png_pixels(encoded: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def nan_column(pixels: np.ndarray) -> bool:
    """Whether some pixel column holds a long magenta run: a NaN step across many layers (the
    legend's magenta patch is a few pixels high)."""
    magenta = np.all(pixels == NONFINITE_COLOUR, axis=2)
    return bool(magenta.sum(axis=0).max() > 40)


def test_custom_scalars_open_on_the_overview(demo_logdir: Path) -> None:
    acc = run_events(demo_logdir, "exploding")
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    overview, per_layer = layout.category
    assert (overview.title, overview.closed) == ("gradwatch: overview", False)
    assert per_layer.closed
    titles = [chart.title for chart in overview.chart]
    assert titles[0].startswith("log10 gradient norm by depth")
    assert titles[1].startswith("log10 total gradient norm")
    assert titles[2].startswith("alerts so far")
    tags = acc.Tags()[ea.SCALARS]
    for chart in overview.chart:
        assert any(re.search(p, tag) for p in chart.multiline.tag for tag in tags), chart.title


def test_depth_bands_tell_vanishing_from_healthy(demo_logdir: Path) -> None:
    def last(name: str, band: str) -> float:
        return run_events(demo_logdir, name).Scalars(f"gradwatch/depth/{band}_log10")[-1].value

    vanishing = last("vanishing", "output_third") - last("vanishing", "input_third")
    healthy = last("healthy", "output_third") - last("healthy", "input_third")
    assert vanishing > 4.0 > 1.0 > abs(healthy)  # decades between the ends of the network
    peak = run_events(demo_logdir, "exploding").Scalars("gradwatch/depth/all_layers_peak_log10")
    assert len(peak) == DEMO_STEPS and peak[-1].value > 3.0  # the step-0 spike, kept to the end


def test_alerts_are_counted_at_their_step_and_logged_in_order(demo_logdir: Path) -> None:
    acc = run_events(demo_logdir, "exploding")
    counts = acc.Scalars("gradwatch/alerts/exploding")
    # the step-0 alerts, at step 0 (update size and gradient profile may both report it)
    assert counts[0].step == 0 and counts[0].value >= 1.0
    (newest, *_) = sorted(acc.Tensors("gradwatch/alert_log"), key=lambda e: -e.step)
    log = newest.tensor_proto.string_val[0].decode()
    steps = [int(step) for step in re.findall(r"^\d+\. step (\d+):", log, flags=re.MULTILINE)]
    assert steps[0] == 0 and steps == sorted(steps)


def test_the_gradient_flow_image_is_one_card_wide_and_shows_the_nan(demo_logdir: Path) -> None:
    for name in SCENARIOS:
        (image, *_) = run_events(demo_logdir, name).Images("gradwatch/gradient_flow")[-1:]
        pixels = png_pixels(image.encoded_image_string)
        assert pixels.shape[1] == WIDTH_PX  # the IMAGES tab shows it pixel for pixel
        assert nan_column(pixels) == (name == "nan"), name


@pytest.mark.skipif(
    screenshots_script().find_chromium() is None, reason="needs Chromium (apt-get install chromium)"
)
def test_screenshots_of_every_tab_in_headless_chromium(demo_logdir: Path, tmp_path: Path) -> None:
    script = screenshots_script()
    paths = script.take_screenshots(script.find_chromium(), demo_logdir, tmp_path, len(SCENARIOS))
    assert [path.name for path in paths] == [
        "dashboard_timeseries.png",
        "dashboard.png",
        "dashboard_images.png",
        "dashboard_text.png",
    ]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(f"docs/{path.name}" in readme for path in paths)
    shots = {}
    for tab, path in zip(script.TABS, paths, strict=True):
        pixels = shots[tab] = png_pixels(path.read_bytes())
        assert pixels.shape[:2] == (script.TABS[tab][1], script.WIDTH), tab
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, tab  # a page, not a blank
    assert nan_column(shots["images"])  # the NaN step of the nan run, drawn by the browser
