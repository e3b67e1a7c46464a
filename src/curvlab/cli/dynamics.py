"""``curvlab dynamics``: reproduce the training-dynamics phenomena and write figures and numbers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from curvlab.cli import check_out_dir

__all__ = ["register"]

_CHOICES = ("eos", "subspace", "matrix-sensing", "deep-linear", "neural-collapse")
_CHOICES = (*_CHOICES, "newton", "compression")


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
    which.add_argument("--phenomenon", choices=_CHOICES, help="run one phenomenon")
    which.add_argument("--all", action="store_true", help="run all of them and write index.html")
    parser.add_argument("--out", default="curvlab-out/dynamics", help="output folder")
    parser.add_argument(
        "--quick", action="store_true", help="small configurations (seconds each; the tests' sizes)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run)


def _print_eos_table(numbers: dict[str, Any]) -> None:
    """Print sharpness·η/2 over steps, one column per η (every few checks)."""
    runs = list(numbers["runs"].values())
    if numbers.get("control"):
        runs.append(numbers["control"])
    steps = runs[0]["steps"]
    stride = max(1, len(steps) // 15)
    print("  step  " + "".join(f"η={r['eta']:<7g}" for r in runs) + "  (sharpness·η/2)")
    for i in range(0, len(steps), stride):
        print(f"  {steps[i]:5d} " + "".join(f"{r['ratio'][i]:9.3f}" for r in runs))


def _run(args: argparse.Namespace) -> int:
    from curvlab.phenomena.index import run_all, run_phenomenon

    check_out_dir(args.out)  # before minutes of computing
    progress = not args.no_progress
    if args.all:
        results, index = run_all(args.out, quick=args.quick, progress_bar=progress)
    else:
        results, index = [run_phenomenon(args.phenomenon, args.out, args.quick, progress)], None
    for res in results:
        status = {True: "reproduced", False: "NOT reproduced", None: "not checked"}[res.reproduced]
        print(f"{res.name}: {status} — {res.note}")
        if res.name == "eos":
            _print_eos_table(res.numbers)
        print(f"  figure {res.figure}  numbers {res.json_path}")
    if index is not None:
        print(f"index: {index}")
    sys.stdout.flush()
    return 0
