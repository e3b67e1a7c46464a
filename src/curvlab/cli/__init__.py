"""The ``curvlab`` command line: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``curvlab`` parser with every subcommand (``bench``, ``spectrum``, ``dynamics``)."""
    parser = argparse.ArgumentParser(
        prog="curvlab",
        description="curvlab: measure curvature, train with research optimizers, benchmark them.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from curvlab.cli import bench, dynamics, spectrum

    for command in (bench, spectrum, dynamics):
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
