"""The numerical context of curvature products and estimators: full precision, math attention.

Operators compute the curvature of the model in its parameters' dtype: every forward they run,
every product and every estimator's own linear algebra runs with autocast disabled (whatever
``torch.autocast`` the caller has active), and scaled-dot-product attention runs on its math
kernel, the one whose backward is itself differentiable (the fused flash/memory-efficient
kernels have no double backward) and which computes what eager attention computes.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["UnwrappedModelWarning", "full_precision", "in_full_precision", "model_context"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")
F = TypeVar("F", bound=Callable[..., Any])


class UnwrappedModelWarning(UserWarning):
    """A compiled or DDP-wrapped model was unwrapped: curvature is computed on the original module."""


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable every active autocast inside the block (the caller's setting is restored after)."""
    active = [kind for kind in _AUTOCAST_DEVICES if torch.is_autocast_enabled(kind)]
    if not active:
        yield
        return
    with contextlib.ExitStack() as stack:
        for kind in active:
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def in_full_precision(fn: F) -> F:
    """Decorate an estimator so that its products and linear algebra run without autocast."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with full_precision():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def model_context() -> Iterator[None]:
    """The context of an operator's own forwards: no autocast, math attention (double backward)."""
    with full_precision(), sdpa_kernel(SDPBackend.MATH):
        yield


def unwrap_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The module a ``torch.compile`` or (Distributed)DataParallel wrapper holds, and its prefix.

    Compiled modules (``_orig_mod``) cannot be differentiated twice (``aot_autograd`` has no double
    backward) and DDP's hooks reduce gradients across processes, so operators differentiate the
    wrapped module (the same parameters) and warn once with :class:`UnwrappedModelWarning`.
    Returns the module and the prefix its parameter names carry in the wrapper (``"_orig_mod."``).
    """
    prefix = ""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            what, key = "torch.compile", "_orig_mod"
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner, what, key = model.module, type(model).__name__, "module"
        else:
            return model, prefix
        warnings.warn(
            f"the model is wrapped by {what}; curvature operators differentiate twice, which the "
            f"wrapper does not support, so this operator uses the wrapped module (model.{key}, "
            "the same parameters) in eager mode",
            UnwrappedModelWarning,
            stacklevel=4,
        )
        model, prefix = inner, prefix + key + "."
