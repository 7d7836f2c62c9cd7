"""Screenshots of the TensorBoard dashboard of ``gradwatch demo``, taken in headless Chromium.

Trains the demo scenarios (or reads ``--logdir``), serves them with TensorBoard on localhost and
saves one screenshot per tab under ``--out``: ``dashboard.png`` (CUSTOM SCALARS, the overview),
``dashboard_timeseries.png``, ``dashboard_images.png`` and ``dashboard_text.png``. The README
shows them; ``tests/test_dashboard.py`` takes the same screenshots when Chromium is installed and
asserts the tags and layout they show.

Run: ``python scripts/dashboard_screenshots.py --out docs``
(Chromium: ``apt-get install chromium``; no network access is needed.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TABS = {  # tab: (URL suffix, window height); the CUSTOM SCALARS overview is dashboard.png
    "timeseries": ("?forceSVG=true#timeseries", 1000),  # SVG lines: headless Chromium has no WebGL
    "custom_scalars": ("#custom_scalars", 780),
    "images": ("#images", 1350),  # the four runs' images
    "text": ("#text", 1000),
}
WIDTH = 1400
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STARTUP_TIMEOUT_S = 120.0


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def tensorboard(logdir: Path, runs: int) -> Iterator[str]:
    """Serves ``logdir`` on localhost; yields the base URL once ``runs`` runs are served."""
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
                raise RuntimeError(f"tensorboard exited at start-up: {error[-500:]}")
            try:
                with urllib.request.urlopen(base + "/data/plugin/scalars/tags", timeout=10) as r:
                    if len(json.loads(r.read().decode())) >= runs:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensorboard did not serve {logdir} in {STARTUP_TIMEOUT_S} s")
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


def screenshot(chromium: str, url: str, path: Path, window: tuple[int, int]) -> None:
    """Saves a PNG of ``url`` as headless Chromium draws it after the page settled."""
    with tempfile.TemporaryDirectory(prefix="gradwatch-chromium-") as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--screenshot={path}",
                f"--window-size={window[0]},{window[1]}",
                "--virtual-time-budget=20000",
                url,
            ],
            capture_output=True,
            timeout=180,
            check=True,
        )
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url}")


def file_name(tab: str) -> str:
    """``dashboard.png`` for the CUSTOM SCALARS tab, ``dashboard_<tab>.png`` for the others."""
    return "dashboard.png" if tab == "custom_scalars" else f"dashboard_{tab}.png"


def take_screenshots(chromium: str, logdir: Path, out: Path, runs: int) -> list[Path]:
    """One screenshot per tab of TensorBoard serving ``logdir``, saved under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with tensorboard(logdir, runs) as base:
        for tab, (suffix, height) in TABS.items():
            path = out / file_name(tab)
            screenshot(chromium, f"{base}/{suffix}", path, (WIDTH, height))
            paths.append(path)
    return paths


def train_demo(logdir: Path, steps: int) -> int:
    """Trains every demo scenario into ``logdir``; returns the number of runs."""
    import logging

    import torch

    from gradwatch.demo import SCENARIOS, run_scenario

    torch.set_num_threads(1)
    logging.getLogger("gradwatch").setLevel(logging.CRITICAL)  # the alerts are in the pictures
    for name in SCENARIOS:
        run_scenario(name, logdir, steps=steps, out=open(os.devnull, "w"))  # noqa: SIM115
    return len(SCENARIOS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go")
    parser.add_argument("--logdir", type=Path, help="existing runs instead of training the demo")
    parser.add_argument("--steps", type=int, default=300, help="demo steps per scenario")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="gradwatch-demo-") as scratch:
        logdir = args.logdir
        if logdir is None:
            logdir = Path(scratch)
            runs = train_demo(logdir, args.steps)
        else:
            runs = len({p.parent for p in logdir.rglob("events.out.tfevents.*")})
        for path in take_screenshots(chromium, logdir, args.out, runs):
            print(path)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gradwatch
    raise SystemExit(main())
