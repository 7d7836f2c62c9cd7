"""The ``gradwatch`` command (also ``python -m gradwatch``): ``demo`` and ``report``.

Nothing heavy is imported until a command runs, so ``gradwatch --help`` answers at once (torch is
imported by ``demo`` only; ``report`` reads event files with TensorBoard).

Example:
    $ gradwatch demo --logdir runs/demo
    $ tensorboard --logdir runs/demo
    $ gradwatch report runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from gradwatch import __version__

SCENARIOS = ("vanishing", "healthy", "exploding", "nan")
"""The demo scenarios (``gradwatch.demo`` trains them)."""

DEFAULT_STEPS = 300
"""Optimizer steps per demo scenario."""

EXIT_OK = 0
EXIT_FINDINGS = 1  # report: a warning or an error alert (see --fail-on); demo: logs not written
EXIT_USAGE = 2  # bad arguments, or nothing to report
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a pipeline reader that went away
EXIT_INTERRUPTED = 130  # 128 + SIGINT

_RULE = "-" * 72
_FAIL_ON = ("warning", "error", "never")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success; 1 when ``report`` finds a warning or an error alert (see
        ``--fail-on``) or ``demo`` could not write its logs; 2 on usage errors and when there is
        nothing to report; 130 on Ctrl-C; 141 when the reader of the output went away (``| head``).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ngradwatch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Watch per-layer gradient norms of PyTorch training: demo runs and reports.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train small models that show vanishing/exploding/NaN gradients and a healthy fix",
        description=(
            "Trains small models on built-in synthetic data, writes one TensorBoard run per "
            "scenario and prints each diagnosis."
        ),
    )
    demo.add_argument(
        "--logdir", default="runs/demo", help="parent directory of the runs (default: runs/demo)"
    )
    demo.add_argument(
        "--scenario",
        choices=("all", *SCENARIOS),
        default="all",
        help="which scenario to run (default: all)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        help=f"optimizer steps per scenario (default: {DEFAULT_STEPS})",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of models and data (default: 0)")
    demo.set_defaults(run=_run_demo)

    report = commands.add_parser(
        "report",
        help="print the diagnosis of a finished run from its TensorBoard event files",
        description="Reads the event files under LOGDIR and prints each gradwatch run's diagnosis.",
        epilog=(
            "exit status: 0 no warning or error alert; 1 a warning or error alert was found (see "
            "--fail-on); 2 nothing to report (no such directory, no gradwatch data) or bad "
            "arguments"
        ),
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a run directory or a parent of runs")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument(
        "--fail-on",
        choices=_FAIL_ON,
        default="warning",
        help="lowest alert severity that makes the exit status 1 (default: warning)",
    )
    report.set_defaults(run=_run_report)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    problem = _unwritable(args.logdir)
    if problem is not None:
        print(
            f"gradwatch demo: error: cannot write to --logdir {args.logdir}: {problem}",
            file=sys.stderr,
        )
        return EXIT_FINDINGS
    import warnings

    import torch

    from gradwatch.demo import run_scenario

    torch.set_num_threads(1)  # the demo models are tiny: more threads only add overhead
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for name in names:
            result = run_scenario(name, args.logdir, steps=args.steps, seed=args.seed)
            print(f"{_RULE}\n{result.diagnosis}\n{_RULE}\n", flush=True)
            results.append(result)
    failures = [str(w.message) for w in caught if "TensorBoard" in str(w.message)]
    for warning in caught:
        if str(warning.message) not in failures:
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    print("scenario     alerts")
    for result in results:
        kinds = sorted({alert.kind.value for alert in result.alerts})
        print(f"{result.name:<12} {', '.join(kinds) if kinds else 'none'}")
    if failures:
        print(
            f"\ngradwatch demo: error: the TensorBoard runs were not written: {failures[0]}",
            file=sys.stderr,
        )
        return EXIT_FINDINGS
    print(f"\nTensorBoard runs written to {args.logdir}; look at them with:")
    print(f"  tensorboard --logdir {args.logdir}")
    print("  (CUSTOM SCALARS: the overview; IMAGES: the gradient flow; TEXT: the alerts)")
    print(f"or read the diagnosis back with:\n  gradwatch report {args.logdir}")
    return EXIT_OK


def _run_report(args: argparse.Namespace) -> int:
    from gradwatch.report import ReportError, format_run, load_reports, report_json, worst_severity

    try:
        reports = load_reports(args.logdir)
    except ReportError as error:
        print(f"gradwatch report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report_json(reports), indent=2))
    else:
        print("\n\n".join(format_run(report) for report in reports))
    sys.stdout.flush()  # a closed pipe fails here, inside main(), not at interpreter exit
    worst = worst_severity(reports)
    failing = {"warning": ("warning", "error"), "error": ("error",), "never": ()}[args.fail_on]
    return EXIT_FINDINGS if worst in failing else EXIT_OK


def _unwritable(logdir: str) -> str | None:
    """Why ``logdir`` cannot hold the demo's runs (None: it can; it is created)."""
    try:
        os.makedirs(logdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=logdir):
            pass
    except OSError as error:
        return error.strerror or repr(error)
    return None


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that Python's final flush finds no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (captured, replaced)
        pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
