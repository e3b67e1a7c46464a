"""Argument checks shared by the operators and the estimators: one message style for bad input."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from curvlab.errors import InvalidArgumentError, UnknownOptionError

__all__ = ["check_choice", "check_positive_float", "check_positive_int"]


def check_choice(value: Any, options: Sequence[str], what: str) -> str:
    """Return ``value`` if it is one of ``options``, else raise :class:`UnknownOptionError`.

    The message lists the options and, when one is close to ``value``, suggests it.
    """
    if isinstance(value, str) and value in options:
        return value
    import difflib  # only on the error path: not a module every import of curvlab pays for

    close = difflib.get_close_matches(str(value), options, n=1) if isinstance(value, str) else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(repr(o) for o in options)
    raise UnknownOptionError(f"unknown {what} {value!r}; use one of {listed}.{hint}")


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= 1``, else raise :class:`InvalidArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(
            f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__}); "
            f"pass e.g. {name}={max(1, _as_int(value))}"
        )
    if value < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, got {value}; pass a positive integer")
    return int(value)


def check_positive_float(value: Any, name: str) -> float:
    """Return ``value`` as a ``float`` if it is finite and ``> 0``, else raise :class:`InvalidArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(
            f"{name} must be a positive number, got {value!r} ({type(value).__name__})"
        )
    if not (math.isfinite(value) and float(value) > 0):
        raise InvalidArgumentError(
            f"{name} must be finite and > 0, got {value}; pass a small positive number such as "
            f"{name}=1e-3"
        )
    return float(value)


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 1
