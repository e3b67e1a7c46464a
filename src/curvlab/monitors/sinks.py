"""Where monitor numbers go: memory, a CSV file, TensorBoard, a callback.

A sink is any object with ``write(step: int, values: dict[str, float]) -> None``; ``flush()`` and
``close()`` are optional. :func:`curvlab.monitors.attach` calls ``write`` once per check with every
due monitor's numbers keyed ``"<monitor>/<number>"``. The sinks do the I/O so monitors never do.
The benchmark store's sink is :class:`curvlab.bench.StoreSink`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from curvlab._optional import optional_attr
from curvlab.errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["CSVSink", "CallbackSink", "HistorySink", "TensorBoardSink"]


class HistorySink:
    """Keep every number in memory: ``history[name] -> list of (step, value)``.

    Example:
        >>> sink = HistorySink()
        >>> sink.write(10, {"sharpness/value": 3.0})
        >>> sink.write(20, {"sharpness/value": 4.0})
        >>> sink.values("sharpness/value"), sink.steps("sharpness/value")
        ([3.0, 4.0], [10, 20])
    """

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Append each value under its name."""
        for name, value in values.items():
            self.history.setdefault(name, []).append((int(step), float(value)))

    def steps(self, name: str) -> list[int]:
        """The steps at which ``name`` was recorded."""
        return [s for s, _ in self.history.get(name, [])]

    def values(self, name: str) -> list[float]:
        """The recorded values of ``name``, in order."""
        return [v for _, v in self.history.get(name, [])]

    def last(self, name: str) -> float:
        """The most recent value of ``name`` (NaN when never recorded)."""
        series = self.history.get(name)
        return series[-1][1] if series else math.nan

    def names(self) -> list[str]:
        """Every recorded name, sorted."""
        return sorted(self.history)


class CSVSink:
    """Append numbers to a CSV file in long form: one row ``step,name,value`` per number.

    Long form keeps the file valid when monitors run at different frequencies or one fails. The
    file is created (with its header) on construction; rows are flushed on every write, so a crash
    loses nothing.

    Args:
        path: the CSV file; its folder is created if needed.
        append: keep an existing file's rows instead of truncating it.
    """

    header = ("step", "name", "value")

    def __init__(self, path: str | os.PathLike[str], append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (append and self.path.exists() and self.path.stat().st_size > 0)
        self._file = self.path.open("a" if append else "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if fresh:
            self._writer.writerow(self.header)
            self._file.flush()

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Write one row per value and flush."""
        for name, value in values.items():
            self._writer.writerow((int(step), name, repr(float(value))))
        self._file.flush()

    def flush(self) -> None:
        """Flush the file."""
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if not self._file.closed:
            self._file.close()

    @staticmethod
    def read(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
        """Read a file written by :class:`CSVSink` back into ``name -> [(step, value)]``."""
        out: dict[str, list[tuple[int, float]]] = {}
        with Path(path).open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                out.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
        return out


class TensorBoardSink:
    """Write numbers as TensorBoard scalars (``SummaryWriter.add_scalar(name, value, step)``).

    Either opens a writer on ``log_dir`` (and closes it in :meth:`close`), or writes to an existing
    ``writer`` — the one your training loop or framework already uses (e.g. Lightning's
    ``trainer.logger.experiment``) — which it then never closes.

    Needs the optional ``tensorboard`` package (``pip install curvlab[tensorboard]``).

    Args:
        log_dir: the TensorBoard run folder (a new writer).
        writer: an existing ``SummaryWriter`` (or anything with ``add_scalar``) instead.

    Raises:
        InvalidArgumentError: both or neither of ``log_dir`` and ``writer``.
        ArgumentTypeError: ``writer`` has no ``add_scalar`` method.
        ImportError: tensorboard is not installed (the message says how to install it).

    Example:
        >>> class Writer:
        ...     def add_scalar(self, name, value, step): print(name, value, step)
        >>> TensorBoardSink(writer=Writer()).write(3, {"sharpness/value": 2.0})
        sharpness/value 2.0 3
    """

    def __init__(
        self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None
    ) -> None:
        if (log_dir is None) == (writer is None):
            raise InvalidArgumentError(
                "TensorBoardSink takes log_dir= (a new SummaryWriter) or writer= (an existing "
                "one), exactly one of them"
            )
        self._owns = writer is None
        if writer is not None:
            if not callable(getattr(writer, "add_scalar", None)):
                raise ArgumentTypeError(
                    f"writer must be a SummaryWriter (with add_scalar), got {type(writer).__name__}"
                )
            self.writer = writer
            return
        SummaryWriter = optional_attr(
            "torch.utils.tensorboard",
            "SummaryWriter",
            "TensorBoardSink needs the optional 'tensorboard' package: pip install tensorboard "
            "(or use CSVSink / HistorySink)",
        )
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Add each value as a scalar at ``step``."""
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), int(step))

    def flush(self) -> None:
        """Flush pending events to disk."""
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        """Close the writer if this sink opened it; a writer passed in is only flushed."""
        if self._owns:
            self.writer.close()
        else:
            self.flush()


class CallbackSink:
    """Hand each check to a function ``fn(step, values)`` — e.g. a benchmark store's recorder.

    This is the generic bridge to anything that records metrics (the benchmark store, a W&B or
    MLflow logger): ``CallbackSink(lambda step, values: store.log_metrics(run_id, step, values))``.

    Args:
        fn: called as ``fn(step, values)`` with ``values`` a fresh ``dict[str, float]``.
        prefix: optional string prepended to every name (e.g. ``"monitors/"``).

    Example:
        >>> seen = []
        >>> sink = CallbackSink(lambda step, values: seen.append((step, values)), prefix="m/")
        >>> sink.write(3, {"cos/value": 0.5})
        >>> seen
        [(3, {'m/cos/value': 0.5})]
    """

    def __init__(self, fn: Callable[[int, dict[str, float]], Any], prefix: str = "") -> None:
        if not callable(fn):
            raise ArgumentTypeError(
                f"CallbackSink needs a callable fn(step, values), got {type(fn).__name__}"
            )
        self.fn = fn
        self.prefix = prefix

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Call ``fn(step, {prefix + name: value})``."""
        self.fn(int(step), {self.prefix + k: float(v) for k, v in values.items()})
