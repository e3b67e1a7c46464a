"""``curvlab dynamics``: reproduce the training-dynamics phenomena and write figures and numbers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from curvlab.cli import check_out_dir, positive_int

__all__ = ["register"]


def _phenomenon(name: str) -> str:
    """argparse type: a name from the phenomena registry (imported only when the flag is used)."""
    from curvlab.phenomena.index import PHENOMENA

    if name not in PHENOMENA:
        raise argparse.ArgumentTypeError(
            f"unknown phenomenon {name!r}; choose one of {', '.join(PHENOMENA)}"
        )
    return name


def register(subparsers: Any) -> None:
    """Add the ``dynamics`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "dynamics",
        help="reproduce edge of stability, tiny subspace, matrix sensing, deep linear, neural collapse",
        description=(
            "Reproduce a seed paper's training-dynamics phenomenon on a CPU-sized problem and write "
            "its figure (PNG) and numbers (JSON) into --out. --all runs every phenomenon and adds "
            "an index.html with a two-line caption per figure. The tiny-subspace check uses "
            "Fashion-MNIST from Debian's dataset-fashion-mnist package when installed, otherwise "
            "the shipped digits (and says it does not reproduce there)."
        ),
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--phenomenon",
        type=_phenomenon,
        metavar="NAME",
        help="run one phenomenon (a name of curvlab.phenomena.PHENOMENA, e.g. eos, central-flow)",
    )
    which.add_argument("--all", action="store_true", help="run all of them and write index.html")
    parser.add_argument("--out", default="curvlab-out/dynamics", help="output folder")
    parser.add_argument(
        "--quick", action="store_true", help="small configurations (seconds each; the tests' sizes)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --all: run the phenomena in N processes, each on one thread (default: one "
        "per core; the numbers do not depend on N)",
    )
    parser.set_defaults(func=_run)


def _print_eos_table(numbers: dict[str, Any]) -> None:
    """Print sharpness·η/2 over steps, one column per η (every few checks)."""
    runs = list(numbers["runs"].values())
    if numbers.get("control"):
        runs.append(numbers["control"])  # checked on its own schedule: blank where it has none
    by_step = [dict(zip(r["steps"], r["ratio"])) for r in runs]
    steps = runs[0]["steps"]
    stride = max(1, len(steps) // 15)
    print("  step  " + "".join(f"η={r['eta']:<7g}" for r in runs) + "  (sharpness·η/2)")
    for step in steps[::stride]:
        cells = (f"{d[step]:9.3f}" if step in d else " " * 9 for d in by_step)
        print(f"  {step:5d} " + "".join(cells))


def _run(args: argparse.Namespace) -> int:
    from curvlab.phenomena.index import run_all, run_phenomenon

    check_out_dir(args.out)  # before minutes of computing
    progress = not args.no_progress
    if args.all:
        results, index = run_all(
            args.out, quick=args.quick, progress_bar=progress, workers=args.workers
        )
    else:
        results, index = [run_phenomenon(args.phenomenon, args.out, args.quick, progress)], None
    for res in results:
        print(f"{res.name}: {res.status} — {res.note}")
        if res.name == "eos":
            _print_eos_table(res.numbers)
        print(f"  figure {res.figure}  numbers {res.json_path}")
    if index is not None:
        print(f"index: {index}")
    sys.stdout.flush()
    return 0
