"""The ``curvlab`` command line: a thin layer that parses arguments and calls the library.

Failure rule: every failure is one line on stderr and a non-zero exit, never a traceback. Bad
arguments and :class:`~curvlab.errors.CurvlabError` exit 2 (``curvlab <command>: error: ...``);
Ctrl-C exits 130; a full disk under ``--out``, ``--report`` or the store is a CurvlabError that names
the path; another operating-system error (permissions) or a database error exits 1 with the path;
anything else is reported as an internal error (exit 1) whose traceback
``CURVLAB_DEBUG=1`` shows.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from curvlab.errors import CurvlabError, OutputPathError

__all__ = ["check_out_dir", "main", "positive_float", "positive_int"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def positive_float(text: str) -> float:
    """An ``argparse`` type: a positive finite number."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return x


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create the output folder ``path`` now, before any work, or say why it cannot be used.

    Raises:
        OutputPathError: ``path`` is a file, lies inside a file, or is not writable.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {p} is a file; give a folder")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"{flag} {p} lies inside the file {parent}; give a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{flag} {p} cannot be created: {exc.strerror or exc}") from exc
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {p} is read-only; choose a writable folder")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``curvlab`` parser with every subcommand (``bench``, ``spectrum``, ``dynamics``)."""
    parser = _Parser(
        prog="curvlab",
        description="curvlab: measure curvature, train with research optimizers, benchmark them.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from curvlab.cli import bench, dynamics, spectrum

    for command in (bench, spectrum, dynamics):
        command.register(subparsers)
    return parser


def _os_error(exc: OSError) -> str:
    where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{exc.strerror or exc}{': ' + where if where else ''}"


def _full_out_dir(exc: OSError, args: argparse.Namespace) -> OutputPathError | None:
    """The error that names the output folder of ``args`` when a write into it found the disk
    full (the operating system's error names no file), else ``None``."""
    for flag in ("--out", "--report"):
        out = getattr(args, flag[2:], None)
        if out is not None and exc.errno == errno.ENOSPC:
            return OutputPathError(
                f"cannot write into {flag} {exc.filename or out}: the disk is full "
                f"({exc.strerror}); free space or choose another {flag}"
            )
    return None


def _guarded(prog: list[str], run: Callable[[], int]) -> int:
    """Run ``run`` and turn every failure into one line on stderr (``prog[0]: ...``) and a code."""

    def say(message: str) -> None:
        print(f"{prog[0]}: {message}", file=sys.stderr, flush=True)

    try:
        return run()
    except CurvlabError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted; what was finished is saved, rerun the same command to resume")
        return 130
    except OSError as exc:
        say(f"error: {_os_error(exc)}")
        return 1
    except sqlite3.Error as exc:
        say(f"error: the store cannot be used: {exc} (a damaged file, or a full disk?)")
        return 1
    except Exception as exc:
        if os.environ.get("CURVLAB_DEBUG"):
            raise
        say(
            f"internal error: {type(exc).__name__}: {exc} (rerun with CURVLAB_DEBUG=1 for the "
            "traceback)"
        )
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    prog = ["curvlab"]

    def run() -> int:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        prog[0] = f"curvlab {args.command}"
        try:
            return int(args.func(args) or 0)
        except OSError as exc:
            full = _full_out_dir(exc, args)
            if full is None:
                raise
            raise full from exc

    return _guarded(prog, run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
