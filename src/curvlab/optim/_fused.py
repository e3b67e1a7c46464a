"""Compiled element-wise kernels: the ``fused=True`` path of the element-wise optimizers.

An optimizer's update written as one Python function of lists of whole tensors (a *kernel*,
in-place on the state, a loop over the tensors) is handed to ``torch.compile`` (inductor), which
emits one loop over memory per tensor, all in one compiled call per bucket of a param group
(:func:`fused_foreach`): each entry of the parameter, gradient and state is read and written once,
as in torch's own ``AdamW(fused=True)``, which also takes a group's tensors in one call. The eager
``foreach`` paths make one pass per operation.

Cost, measured on a 2-core CPU (torch 2.13, inductor's C++ backend): the first ``fused`` step
compiles, ~30 s with a cold inductor cache and ~10 s with a warm one (the cache lives on disk and
is shared by processes), once per kernel, dtypes, tensor ranks and bucket length per process
(shapes are dynamic, hyper-parameters are passed as 0-d tensors: changing ``lr`` or the step does
not recompile; bucket lengths are powers of two up to :data:`MAX_BUCKET`). Hence
``fused`` is never a default: it pays off for long runs of large models. Where ``torch.compile``
has no backend (no C++ compiler on CPU, no Triton on CUDA) the first step raises torch's error.

``EAGER = True`` runs the kernels uncompiled (the same arithmetic, one pass per operation): the
tests use it to check every kernel against the single-tensor reference without paying the compile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab.errors import ParameterError

__all__ = [
    "EAGER",
    "MAX_BUCKET",
    "accumulate_dtype",
    "flat",
    "fused_call",
    "fused_foreach",
    "validate_fused",
]

#: run the kernels without ``torch.compile`` (tests; same arithmetic, slower)
EAGER = False

#: the most tensors per compiled call; a bucket is cut into power-of-two lengths up to this, so a
#: kernel compiles for at most log2(MAX_BUCKET) + 1 list lengths (torch.compile's recompile limit
#: is 8 graphs per function)
MAX_BUCKET = 16

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


def fused_foreach(
    kernel: Callable[..., Any],
    rows: Sequence[tuple[Sequence[Tensor], tuple[Any, ...]]],
) -> list[Any]:
    """Run a list kernel over ``rows`` with one compiled call per bucket of rows.

    Each row is ``(tensors, scalars)``: one tensor of each list the kernel takes (parameter,
    gradient, state, ...) and the row's hyper-parameters. Rows whose tensors agree in dtype,
    device, rank after :func:`flat` and ``numel() <= 1`` (inductor specialises sizes 0 and 1), and
    whose scalars are equal, share a bucket; a bucket is cut into runs of power-of-two length up
    to :data:`MAX_BUCKET`, and each run is one call ``kernel(*lists, *scalars)`` on flat views.
    The kernel returns ``None`` or one value per row of the run.

    Returns:
        The kernel's value for each row, in the order of ``rows`` (``None`` where it returned
        nothing).

    Example:
        >>> import curvlab.optim._fused as F
        >>> def scale_(xs, a):
        ...     for x in xs:
        ...         x.mul_(a)
        >>> F.EAGER, old = True, F.EAGER
        >>> x, y = torch.ones(2), torch.ones(3)
        >>> fused_foreach(scale_, [((x,), (2.0,)), ((y,), (2.0,))])
        [None, None]
        >>> F.EAGER = old
        >>> x.tolist(), y.tolist()
        ([2.0, 2.0], [2.0, 2.0, 2.0])
    """
    buckets: dict[tuple[Any, ...], list[int]] = {}
    views = [[flat(t) for t in tensors] for tensors, _ in rows]
    for i, ((_, scalars), ts) in enumerate(zip(rows, views)):
        sig = tuple((t.dtype, t.device, t.dim(), t.numel() <= 1) for t in ts)
        buckets.setdefault((sig, scalars), []).append(i)
    out: list[Any] = [None] * len(rows)
    for (_, scalars), idx in buckets.items():
        start = 0
        while start < len(idx):
            run = idx[start : start + _run_length(len(idx) - start)]
            start += len(run)
            lists = [list(col) for col in zip(*(views[i] for i in run))]
            values = fused_call(kernel, *lists, *scalars)
            if values is not None:
                for i, v in zip(run, values):
                    out[i] = v
    return out


def _run_length(n: int) -> int:
    """The largest power of two ``<= min(n, MAX_BUCKET)``."""
    return 1 << (min(n, MAX_BUCKET).bit_length() - 1)


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
