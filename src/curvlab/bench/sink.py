"""A monitor sink that records into the benchmark store (its ``monitors`` table).

Use it with :func:`curvlab.monitors.attach` to keep a run's training-dynamics numbers beside the
benchmark's runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from curvlab.bench.store import Store

__all__ = ["MonitorWriter", "StoreSink"]


class MonitorWriter(Protocol):
    """What a :class:`StoreSink` writes into: a :class:`~curvlab.bench.Store` or a stand-in."""

    def add_monitor_values(self, key: str, step: int, values: Mapping[str, float]) -> None:
        """Record one monitor check (``name -> value`` at ``step``) under ``key``."""


class StoreSink:
    """Record every check into a :class:`curvlab.bench.Store` (its ``monitors`` table).

    Each check is one SQLite transaction, so a crash loses at most the check being written; the
    values sit beside the benchmark's runs and are exported with them.

    Args:
        store: a :class:`~curvlab.bench.Store` or the path of one (opened, created if needed), or
            any :class:`MonitorWriter` (e.g. a Ray worker's stand-in that sends the values to the
            driver).
        key: the run the values belong to (a benchmark ``run_id`` or any label).
        prefix: optional string prepended to every name.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "store.sqlite")
        >>> sink = StoreSink(path, key="my-run")
        >>> sink.write(10, {"sharpness/ratio": 0.97})
        >>> sink.store.monitor_values("my-run")
        [{'key': 'my-run', 'step': 10, 'name': 'sharpness/ratio', 'value': 0.97}]
        >>> sink.close()
    """

    def __init__(
        self, store: MonitorWriter | str | os.PathLike[str], key: str, prefix: str = ""
    ) -> None:
        self._owned = isinstance(store, (str, os.PathLike))
        self.store: MonitorWriter = Store(store) if isinstance(store, (str, os.PathLike)) else store
        self.key = str(key)
        self.prefix = prefix

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Store ``{prefix + name: value}`` at ``step`` in one transaction."""
        self.store.add_monitor_values(
            self.key, step, {self.prefix + k: v for k, v in values.items()}
        )

    def close(self) -> None:
        """Close the store if this sink opened it."""
        if isinstance(self.store, Store) and self._owned:
            self.store.close()
