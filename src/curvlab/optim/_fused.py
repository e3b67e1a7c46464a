"""Compiled element-wise kernels: the ``fused=True`` path of the element-wise optimizers.

An optimizer's per-tensor update written as one Python function of whole tensors (a *kernel*,
in-place on the state) is handed to ``torch.compile`` (inductor), which emits one loop over memory
per tensor: each entry of the parameter, gradient and state is read and written once, as in
torch's own ``AdamW(fused=True)``. The eager ``foreach`` paths make one pass per operation.

Cost, measured on a 2-core CPU (torch 2.13, inductor's C++ backend): the first ``fused`` step
compiles, ~30 s with a cold inductor cache and ~10 s with a warm one (the cache lives on disk and
is shared by processes), once per kernel, dtype and tensor rank per process (shapes are dynamic,
hyper-parameters are passed as 0-d tensors: changing ``lr`` or the step does not recompile). Hence
``fused`` is never a default: it pays off for long runs of large models. Where ``torch.compile``
has no backend (no C++ compiler on CPU, no Triton on CUDA) the first step raises torch's error.

``EAGER = True`` runs the kernels uncompiled (the same arithmetic, one pass per operation): the
tests use it to check every kernel against the single-tensor reference without paying the compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvlab.errors import ParameterError

__all__ = ["EAGER", "accumulate_dtype", "flat", "fused_call", "validate_fused"]

#: run the kernels without ``torch.compile`` (tests; same arithmetic, slower)
EAGER = False

_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}


def fused_call(kernel: Callable[..., Any], *args: Any) -> Any:
    """Run ``kernel(*args)`` compiled (once per process and kernel), or eagerly under ``EAGER``.

    Example:
        >>> import curvlab.optim._fused as F
        >>> def double_(x):
        ...     x.mul_(2)
        >>> F.EAGER, old = True, F.EAGER
        >>> x = torch.ones(2)
        >>> fused_call(double_, x)
        >>> F.EAGER = old
        >>> x.tolist()
        [2.0, 2.0]
    """
    if EAGER:
        return kernel(*args)
    # Python floats would be specialised (one recompile per value of the clip or step size):
    # 0-d float64 tensors are graph inputs, and do not promote the dtype of full tensors
    # (torch.scalar_tensor: half the cost of torch.tensor per scalar, ~3 us vs ~6 us on CPU)
    args = tuple(
        torch.scalar_tensor(a, dtype=torch.float64) if isinstance(a, float) else a for a in args
    )
    compiled = _COMPILED.get(kernel)
    if compiled is None:
        compiled = torch.compile(kernel, dynamic=True, fullgraph=True)
        _COMPILED[kernel] = compiled
    return compiled(*args)


def flat(t: Tensor) -> Tensor:
    """A 1-D view of a contiguous tensor (one compiled graph serves every shape); else ``t``."""
    return t.view(-1) if t.is_contiguous() else t


def accumulate_dtype(t: Tensor) -> torch.dtype:
    """The dtype a kernel computes in: float64 for float64, float32 for every other float."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def validate_fused(fused: bool | None, foreach: bool | None) -> None:
    """Check the ``fused``/``foreach`` flags of an optimizer, as torch.optim does.

    Raises:
        ParameterError: both ``fused=True`` and ``foreach=True``.
    """
    if fused and foreach:
        raise ParameterError(
            "fused=True and foreach=True were both given; pick one (fused compiles one kernel "
            "per update, foreach runs the multi-tensor path)"
        )
