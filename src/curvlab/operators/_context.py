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
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.backends import cuda as sdp

__all__ = ["UnwrappedModelWarning", "full_precision", "in_full_precision", "model_context"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")
F = TypeVar("F", bound=Callable[..., Any])
_SDPA_FLAGS = (
    (sdp.flash_sdp_enabled, sdp.enable_flash_sdp),
    (sdp.mem_efficient_sdp_enabled, sdp.enable_mem_efficient_sdp),
    (sdp.cudnn_sdp_enabled, sdp.enable_cudnn_sdp),
    (sdp.math_sdp_enabled, sdp.enable_math_sdp),
)


class UnwrappedModelWarning(UserWarning):
    """A compiled or DDP-wrapped model was unwrapped: curvature is computed on the original module."""


class full_precision:
    """Disable every active autocast inside the block (the caller's setting is restored after).

    A class rather than a generator: it is entered at every product, and costs about a
    microsecond when no autocast is active.
    """

    __slots__ = ("_stack",)

    def __enter__(self) -> None:
        self._stack: contextlib.ExitStack | None = None
        active = [kind for kind in _AUTOCAST_DEVICES if torch.is_autocast_enabled(kind)]
        if active:
            self._stack = contextlib.ExitStack()
            for kind in active:
                self._stack.enter_context(torch.autocast(kind, enabled=False))

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()


def in_full_precision(fn: F) -> F:
    """Decorate an estimator so that its products and linear algebra run without autocast."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with full_precision():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class model_context:
    """The context of an operator's own forwards: no autocast, SDPA on its math kernel only.

    The math kernel is the one whose backward is differentiable again (the flash, memory-efficient
    and cuDNN kernels, on CPU and GPU, have no double backward). The flags are those
    :func:`torch.nn.attention.sdpa_kernel` sets, set through ``torch.backends.cuda`` (which governs
    the CPU kernels too) and restored on exit; ``sdpa_kernel`` itself costs ~70 us per entry, this
    ~2 us, and it is entered at every forward.
    """

    __slots__ = ("_precision", "_saved")

    def __enter__(self) -> None:
        self._saved = tuple(get() for get, _ in _SDPA_FLAGS)
        for _, set_flag in _SDPA_FLAGS:
            set_flag(set_flag is sdp.enable_math_sdp)
        self._precision = full_precision()
        self._precision.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._precision.__exit__(*exc)
        for (_, set_flag), flag in zip(_SDPA_FLAGS, self._saved):
            set_flag(flag)


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
            stacklevel=3,
        )
        model, prefix = inner, prefix + key + "."
