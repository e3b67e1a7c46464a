"""curvlab: a curvature lab for PyTorch.

Operators (which matrix), estimators (which number), optimizers (which update), monitors and a
benchmark harness built on them. See the README for a ten-line tour.

``import curvlab`` loads only the library: the errors, operators, estimators, optimizers and
schedules, whose public names it re-exports. The applications (``bench``, ``phenomena``,
``monitors``, ``distributed``, ``datasets``, ``zoo``, ``cli``) are imported on first use
(``curvlab.bench`` works without an explicit import), so the library never pays for the benchmark's
SQLite store, its worker processes or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from curvlab import errors, estimators, operators, optim, schedules
from curvlab.errors import *  # noqa: F403 - errors.__all__ is the list
from curvlab.estimators import *  # noqa: F403 - estimators.__all__ is the list
from curvlab.operators import *  # noqa: F403 - operators.__all__ is the list

if TYPE_CHECKING:
    from curvlab import bench, cli, datasets, distributed, monitors, phenomena, zoo

__version__ = "0.1.0"

#: Submodules imported on first attribute access (PEP 562).
_LAZY = {"bench", "cli", "datasets", "distributed", "monitors", "phenomena", "zoo"}
_LAZY |= {"landscape", "parametrize"}

__all__ = [
    "bench",
    "cli",
    "datasets",
    "distributed",
    "errors",
    "estimators",
    "monitors",
    "operators",
    "optim",
    "phenomena",
    "schedules",
    "zoo",
]
__all__ += errors.__all__
__all__ += estimators.__all__
__all__ += operators.__all__


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return importlib.import_module(f"curvlab.{name}")
    raise AttributeError(f"module 'curvlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
