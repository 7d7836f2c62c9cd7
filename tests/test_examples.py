"""Smoke test: every script in examples/ runs to completion on a CPU in a short run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
SHORT_STEPS = "12"


def _command(example: Path) -> list[str]:
    """Runs the example with a short ``--steps`` when it accepts one, else with its defaults."""
    command = [sys.executable, str(example)]
    if "--steps" in example.read_text():
        command += ["--steps", SHORT_STEPS]
    return command


def test_the_examples_folder_is_not_empty() -> None:
    assert len(EXAMPLES) >= 4, EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs(example: Path, tmp_path: Path) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        _command(example),
        cwd=tmp_path,  # relative log directories (runs/...) land in the temporary directory
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, (
        f"{example.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )
    assert done.stdout.strip(), f"{example.name} printed nothing for the user to look at"
