"""The ``gradwatch`` command, run as a subprocess (``python -m gradwatch``) like a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.cli import main

DEMO_STEPS = 25
DemoRun = tuple[Path, subprocess.CompletedProcess]


def run_gradwatch(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> DemoRun:
    logdir = tmp_path_factory.mktemp("demo") / "runs"
    result = run_gradwatch("demo", "--logdir", str(logdir), "--steps", str(DEMO_STEPS))
    return logdir, result


def test_demo_trains_every_scenario_and_prints_the_tensorboard_command(
    demo_run: DemoRun,
) -> None:
    logdir, result = demo_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for scenario in ("vanishing", "healthy", "exploding", "nan"):
        assert list((logdir / scenario).glob("events.out.tfevents.*")), scenario
        assert f"[{scenario}]" in result.stdout
    assert f"step {DEMO_STEPS}/{DEMO_STEPS}" in result.stdout  # progress
    assert f"tensorboard --logdir {logdir}" in result.stdout
    verdicts = dict(
        line.split(maxsplit=1)
        for line in result.stdout.splitlines()
        if line.split(maxsplit=1)[:1] in (["vanishing"], ["healthy"], ["exploding"], ["nan"])
        and len(line.split(maxsplit=1)) == 2
    )
    assert "vanishing" in verdicts["vanishing"]
    assert verdicts["healthy"] == "none"
    assert "exploding" in verdicts["exploding"]
    assert "nonfinite" in verdicts["nan"]


def test_report_reads_the_demo_back(
    demo_run: DemoRun,
) -> None:
    logdir, _ = demo_run
    result = run_gradwatch("report", str(logdir))
    assert result.returncode == 0, result.stderr
    sections = {
        block.splitlines()[0].split()[1]: block for block in result.stdout.strip().split("\n\n")
    }
    assert set(sections) == {"vanishing", "healthy", "exploding", "nan"}
    vanishing = sections["vanishing"]
    assert f"steps 0-{DEMO_STEPS - 1} ({DEMO_STEPS} recorded)" in vanishing
    assert "layer" in vanishing and "first" in vanishing and "max" in vanishing
    assert "VANISHING (warning)" in vanishing and "replace Sigmoid" in vanishing
    assert "VANISHING" not in sections["healthy"] and "no alerts" in sections["healthy"]
    assert "NONFINITE (error)" in sections["nan"]


def test_report_of_one_run_directory(demo_run: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    logdir, _ = demo_run
    assert main(["report", str(logdir / "healthy")]) == 0
    assert capsys.readouterr().out.startswith("run . (")


def test_report_of_a_missing_directory_fails_in_one_line(tmp_path: Path) -> None:
    result = run_gradwatch("report", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"gradwatch report: error: no such directory: {tmp_path / 'missing'}"
    )


@pytest.mark.parametrize("kind", ["empty", "foreign"])
def test_report_of_a_directory_without_gradwatch_runs_fails_in_one_line(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "foreign":
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tmp_path)) as writer:
            writer.add_scalar("loss", 1.0, 0)
    assert main(["report", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("gradwatch report: error: no ")
    assert str(tmp_path) in captured.err


def test_usage_errors_exit_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    with pytest.raises(SystemExit) as excinfo:
        main(["demo", "--steps", "0"])
    assert excinfo.value.code == 2
    with pytest.raises(SystemExit) as excinfo:
        main(["demo", "--scenario", "nonsense"])
    assert excinfo.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
