"""Import an optional dependency, or say which package to install."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["optional_attr", "optional_module"]


def optional_attr(module: str, attr: str, why: str) -> Any:
    """``module.attr`` of an optional package; an ImportError saying ``why`` when it is missing.

    Args:
        module: the module to import (e.g. ``"lightning.pytorch"``).
        attr: the name to take from it.
        why: the whole message: who needs the package and how to install it.

    Returns:
        The attribute.

    Raises:
        ImportError: the module cannot be imported (``why``, chained to the original error).
    """
    return getattr(optional_module(module, why), attr)


def optional_module(module: str, why: str) -> Any:
    """The module ``module`` of an optional package; an ImportError saying ``why`` when it is missing.

    Args:
        module: the module to import (e.g. ``"ray"``).
        why: the whole message: who needs the package and how to install it.

    Returns:
        The module.

    Raises:
        ImportError: the module cannot be imported (``why``, chained to the original error).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(why) from exc
