"""The ``gradwatch`` command, run as a subprocess (``python -m gradwatch``) like a user would."""

from __future__ import annotations

import json
import os
import signal
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
    assert "written to" in result.stdout
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


def test_report_reads_the_demo_back_and_fails_on_its_warnings(
    demo_run: DemoRun,
) -> None:
    logdir, _ = demo_run
    result = run_gradwatch("report", str(logdir))
    assert result.returncode == 1, result.stderr  # warnings and errors found: usable in CI
    assert result.stderr == ""
    sections = {
        block.splitlines()[0].split()[1]: block for block in result.stdout.strip().split("\n\n")
    }
    assert set(sections) == {"vanishing", "healthy", "exploding", "nan"}
    vanishing = sections["vanishing"]
    assert f"steps 0-{DEMO_STEPS - 1} ({DEMO_STEPS} recorded)" in vanishing
    assert "layer" in vanishing and "median" in vanishing and "max" in vanishing
    assert "VANISHING (warning)" in vanishing and "replace Sigmoid" in vanishing
    assert "VANISHING" not in sections["healthy"] and "no alerts" in sections["healthy"]
    assert "NONFINITE (error)" in sections["nan"] and "NaN/Inf steps" in sections["nan"]
    # the exploding RNN's step-0 spike is in the table although step 0 is not a log step
    rnn = next(line for line in sections["exploding"].splitlines() if line.startswith("  rnn "))
    assert float(rnn.split()[-1]) > 1e3 > float(rnn.split()[2])  # max over every step vs last
    assert "peak" in sections["exploding"] and "at step 0" in sections["exploding"]


@pytest.mark.parametrize(
    ("fail_on", "scenario", "code"),
    [
        ("warning", "healthy", 0),
        ("warning", "vanishing", 1),
        ("error", "vanishing", 0),
        ("error", "nan", 1),
        ("never", "nan", 0),
    ],
)
def test_report_exit_status_follows_fail_on(
    demo_run: DemoRun,
    fail_on: str,
    scenario: str,
    code: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    logdir, _ = demo_run
    assert main(["report", str(logdir / scenario), "--fail-on", fail_on]) == code
    assert capsys.readouterr().out.startswith("run . (")


def test_report_json(demo_run: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    logdir, _ = demo_run
    assert main(["report", str(logdir), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)  # strict JSON: NaN and Inf are null
    runs = {run["name"]: run for run in data["runs"]}
    assert set(runs) == {"vanishing", "healthy", "exploding", "nan"}
    assert data["worst_severity"] == "error"
    assert runs["healthy"]["worst_severity"] is None and runs["healthy"]["alerts"] == []
    rnn = runs["exploding"]["layers"][0]
    assert rnn["name"] == "rnn" and rnn["max"] > 1e3 > rnn["last"]
    assert runs["exploding"]["total_norm"]["peak_step"] == 0
    nan_alert = runs["nan"]["alerts"][0]
    assert nan_alert["kind"] == "nonfinite" and nan_alert["severity"] == "error"
    assert any(layer["nonfinite_steps"] for layer in runs["nan"]["layers"])


def test_report_piped_into_a_reader_that_stops_early_ends_quietly(demo_run: DemoRun) -> None:
    logdir, _ = demo_run
    command = [sys.executable, "-m", "gradwatch", "report", str(logdir)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # like `| head` exiting before the report is printed
        error = process.stderr.read().decode()
        code = process.wait(timeout=240)
    assert "Traceback" not in error and "BrokenPipeError" not in error, error
    assert code == 141  # 128 + SIGPIPE, what a shell shows for a writer whose reader went away


def test_report_of_one_run_directory(demo_run: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    logdir, _ = demo_run
    assert main(["report", str(logdir / "healthy")]) == 0
    assert capsys.readouterr().out.startswith("run . (")


def test_report_of_a_missing_directory_fails_in_one_line(tmp_path: Path) -> None:
    result = run_gradwatch("report", str(tmp_path / "missing"))
    assert result.returncode == 2
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
    assert main(["report", str(tmp_path)]) == 2
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


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from gradwatch.cli import main\n"
        "for argv in (['--help'], ['demo', '--help'], ['report', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', "
        "'tensorboard', 'matplotlib')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stdout[:300]


def test_demo_scenarios_are_the_ones_the_cli_offers() -> None:
    from gradwatch import cli, demo

    assert set(demo.SCENARIO_SPECS) == set(cli.SCENARIOS)


def test_demo_into_an_unwritable_logdir_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_gradwatch("demo", "--logdir", str(blocker / "runs"), "--steps", "2")
    assert result.returncode == 1
    assert "cannot write to --logdir" in result.stderr and "Traceback" not in result.stderr
    assert "written to" not in result.stdout and "[vanishing]" not in result.stdout


def test_demo_whose_tensorboard_writer_fails_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.utils import tensorboard

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorboard, "SummaryWriter", broken)
    code = main(["demo", "--logdir", str(tmp_path), "--steps", "2", "--scenario", "healthy"])
    captured = capsys.readouterr()
    assert code == 1
    assert "runs were not written" in captured.err and "No space left" in captured.err
    assert "written to" not in captured.out


def test_ctrl_c_exits_with_130_after_a_tensorboard_sink_flushed(tmp_path: Path) -> None:
    script = (
        "import sys, torch, gradwatch as gw\n"
        "model = torch.nn.Linear(4, 1)\n"
        "watch = gw.GradWatch(model, logdir=sys.argv[1], log_every_n_steps=2)\n"
        "for _ in range(4):\n"
        "    model(torch.randn(3, 4)).sum().backward()\n"
        "    watch.step()\n"
        "    model.zero_grad()\n"
        "raise KeyboardInterrupt  # at once: the writer thread is drawing the first image\n"
    )
    environment = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=240,
        env=environment,
        check=False,
    )
    # Python ends itself with SIGINT (-2 here, 130 in a shell); an exception at exit would be 1
    assert done.returncode in (-signal.SIGINT, 130), done.stderr[-2000:]
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_ctrl_c_in_a_command_exits_with_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import gradwatch.report

    def interrupted(logdir: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gradwatch.report, "load_reports", interrupted)
    assert main(["report", "anywhere"]) == 130
    assert "interrupted" in capsys.readouterr().err
