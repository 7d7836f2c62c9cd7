"""The ``gradwatch`` command (also ``python -m gradwatch``): ``demo`` and ``report``.

Example:
    $ gradwatch demo --logdir runs/demo
    $ tensorboard --logdir runs/demo
    $ gradwatch report runs/demo
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradwatch import __version__

_RULE = "-" * 72


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 when ``report`` finds nothing to report, 2 on usage errors.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    code: int = args.run(args)
    return code


def _parser() -> argparse.ArgumentParser:
    from gradwatch.demo import DEFAULT_STEPS, SCENARIOS

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
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a run directory or a parent of runs")
    report.set_defaults(run=_run_report)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from gradwatch.demo import SCENARIOS, run_scenario

    torch.set_num_threads(1)  # the demo models are tiny: more threads only add overhead
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = []
    for name in names:
        result = run_scenario(name, args.logdir, steps=args.steps, seed=args.seed)
        print(f"{_RULE}\n{result.diagnosis}\n{_RULE}\n", flush=True)
        results.append(result)
    print("scenario     alerts")
    for result in results:
        kinds = sorted({alert.kind.value for alert in result.alerts})
        print(f"{result.name:<12} {', '.join(kinds) if kinds else 'none'}")
    print(f"\nTensorBoard runs written to {args.logdir}; look at them with:")
    print(f"  tensorboard --logdir {args.logdir}")
    print(f"or read the diagnosis back with:\n  gradwatch report {args.logdir}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from gradwatch.report import ReportError, build_report

    try:
        text = build_report(args.logdir)
    except ReportError as error:
        print(f"gradwatch report: error: {error}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
