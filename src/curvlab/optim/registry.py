"""One explicit registry of optimizer names -> classes, and ``create(name, params, **kwargs)``.

Adding an optimizer is one line in :data:`OPTIMIZERS`. Names are lower case; lookup ignores case,
``-`` and ``_``.

Example:
    >>> import torch
    >>> opt = create("adopt", torch.nn.Linear(2, 1).parameters(), lr=1e-3)
    >>> type(opt).__name__
    'ADOPT'
    >>> create("adomp", [])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    curvlab.errors.UnknownNameError: unknown optimizer 'adomp'. Did you mean 'adopt'? Known: adahessian, ...
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from torch.optim import Optimizer

from curvlab.errors import ParameterError, UnknownNameError
from curvlab.optim.adahessian import AdaHessian
from curvlab.optim.adopt import ADOPT
from curvlab.optim.dog import DoG, LDoG
from curvlab.optim.frugal import FRUGAL
from curvlab.optim.mfac import MFAC
from curvlab.optim.newton import Newton
from curvlab.optim.psgd_kron import PSGDKron
from curvlab.optim.psgd_lra import PSGDLRA
from curvlab.optim.psgd_xmat import PSGDXMat
from curvlab.optim.sophia import Sophia

__all__ = ["OPTIMIZERS", "available", "create", "lookup"]

#: Every optimizer curvlab can build by name (torch baselines included).
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adopt": ADOPT,
    "dog": DoG,
    "ldog": LDoG,
    "mfac": MFAC,
    "frugal": FRUGAL,
    "sophia": Sophia,
    "adahessian": AdaHessian,
    "psgd_kron": PSGDKron,
    "psgd_lra": PSGDLRA,
    "psgd_xmat": PSGDXMat,
    "newton": Newton,
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def lookup(name: str) -> type[Optimizer] | None:
    """The class registered as ``name`` (case, ``-`` and ``_`` ignored), or ``None``."""
    by_key = {_key(k): cls for k, cls in OPTIMIZERS.items()}
    return by_key.get(_key(name)) if isinstance(name, str) else None


def available() -> list[str]:
    """The registered names, sorted."""
    return sorted(OPTIMIZERS)


def create(name: str, params: Any, **kwargs: Any) -> Optimizer:
    """Build the optimizer registered as ``name`` on ``params`` with ``kwargs``.

    Raises:
        UnknownNameError: unknown name; the message lists the known names and suggests the closest.
        ParameterError: an argument the optimizer does not take (the message lists those it
            takes), or an invalid value.
    """
    cls = lookup(name)
    if cls is None:
        close = difflib.get_close_matches(str(name).lower(), available(), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown optimizer {name!r}.{hint} Known: {', '.join(available())}")
    sig = inspect.signature(cls)
    try:
        sig.bind(params, **kwargs)
    except TypeError as exc:
        takes = ", ".join(n for n in sig.parameters if n != "params")
        raise ParameterError(
            f"{cls.__name__} ({name!r}) does not take these arguments: {exc}; it takes {takes}"
        ) from None
    return cls(params, **kwargs)
