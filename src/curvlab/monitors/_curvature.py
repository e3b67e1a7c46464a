"""Shared bases of the monitors that need the Hessian of the loss on a probe batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvlab.errors import InvalidArgumentError, NotAttachedError
from curvlab.estimators import Eigenpairs, eigsh
from curvlab.monitors._attach import LossFn, Monitor
from curvlab.operators import CountingOperator, HessianOperator, LinearOperator

__all__ = ["EigenMonitor", "HessianMonitor", "ScaledOperator", "optimizer_group"]


class ScaledOperator(LinearOperator):
    """``D A D`` for a symmetric operator ``A`` and a positive diagonal ``D = diag(d)``.

    Its eigenvalues are those of ``D² A`` (similar matrices), so with ``d = P^{-1/2}`` it gives the
    spectrum of the preconditioned Hessian ``P⁻¹H`` through a symmetric operator.
    """

    is_symmetric = True

    def __init__(self, op: LinearOperator, d: Tensor) -> None:
        super().__init__(op.shape, op.dtype, op.device)
        self.op = op
        self.d = d.to(dtype=op.dtype, device=op.device).reshape(-1, 1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.d * self.op.matmat(self.d * V)


def optimizer_group(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict[str, Any]:
    """The param group holding the first of ``params`` (the monitor reads lr/momentum from it)."""
    first = id(params[0])
    for group in optimizer.param_groups:
        if any(id(p) == first for p in group["params"]):
            return group
    return optimizer.param_groups[0]


class HessianMonitor(Monitor):
    """A monitor holding a :class:`~curvlab.operators.HessianOperator` on its probe batch.

    The operator is built at attach time (which checks the probe batch) and reused: its gradient
    graph is cached until a parameter changes, so each check rebuilds it once. Products are
    counted (``self.counter.num_matvecs``). A subclass sets :attr:`default_name`, the name used
    when none is passed.
    """

    default_name: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | Callable[..., Tensor],
        data: tuple[Tensor, Tensor],
        *,
        params: Sequence[Tensor] | None = None,
        every: int = 100,
        name: str | None = None,
    ) -> None:
        super().__init__(
            every=every, name=self.default_name if name is None else name, params=params
        )
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self._op: HessianOperator | None = None
        self.counter: CountingOperator | None = None

    def validate(self, optimizer: torch.optim.Optimizer) -> None:
        """Default checks, then build the Hessian operator on the probe batch."""
        super().validate(optimizer)
        assert self.model is not None and self.data is not None
        self._op = HessianOperator(self.model, self.loss_fn, tuple(self.data), params=self.params)
        self.counter = CountingOperator(self._op)

    @property
    def operator(self) -> HessianOperator:
        """The Hessian operator (available after attach).

        Raises:
            NotAttachedError: read before :func:`~curvlab.monitors.attach`.
        """
        if self._op is None:
            raise NotAttachedError(
                f"monitor {self.name!r} is not attached yet; call "
                "curvlab.monitors.attach(optimizer, monitor) first"
            )
        return self._op

    def _matvecs_since(self, start: int) -> int:
        assert self.counter is not None
        return self.counter.num_matvecs - start


class EigenMonitor(HessianMonitor):
    """A Hessian monitor that computes the top-``k`` eigenpairs by warm-started Lanczos.

    Args:
        model, loss_fn, data, params, every, name: as for :class:`HessianMonitor`.
        k: number of top eigenpairs (``None``: the subclass chooses at attach time).
        tol: Lanczos relative residual tolerance.
        max_matvecs: HVP budget per eigen-solve (default: eigsh's).
        generator: randomness of the first start vector (default: seeded with 0).

    Raises:
        InvalidArgumentError: ``k`` < 1 or ``tol`` not positive.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | Callable[..., Tensor],
        data: tuple[Tensor, Tensor],
        *,
        k: int | None = None,
        tol: float = 1e-2,
        max_matvecs: int | None = None,
        generator: torch.Generator | None = None,
        params: Sequence[Tensor] | None = None,
        every: int = 100,
        name: str | None = None,
    ) -> None:
        super().__init__(model, loss_fn, data, params=params, every=every, name=name)
        if k is not None and (not isinstance(k, int) or k < 1):
            raise InvalidArgumentError(f"k must be an integer >= 1 (eigenpairs), got {k!r}")
        if not tol > 0:
            raise InvalidArgumentError(f"tol must be > 0 (e.g. 1e-3), got {tol!r}")
        self.k = k
        self.tol = tol
        self.max_matvecs = max_matvecs
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def top_eigenpairs(self, op: LinearOperator, v0: Tensor | None) -> tuple[Eigenpairs, int]:
        """The top-``k`` eigenpairs of ``op`` from start vector ``v0``, and the HVPs they took."""
        assert self.counter is not None and self.k is not None
        start = self.counter.num_matvecs
        res = eigsh(
            op,
            k=self.k,
            which="LA",
            tol=self.tol,
            max_matvecs=self.max_matvecs,
            v0=v0,
            generator=self.generator,
        )
        return res, self._matvecs_since(start)
