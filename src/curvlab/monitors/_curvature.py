"""Shared base of the monitors that need the Hessian of the loss on a probe batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.errors import ParameterError
from curvlab.monitors._attach import LossFn, Monitor
from curvlab.operators import CountingOperator, HessianOperator, LinearOperator

__all__ = ["HessianMonitor", "ScaledOperator", "optimizer_group"]


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
    counted (``self.counter.num_matvecs``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | Callable[..., Tensor],
        data: tuple[Tensor, Tensor],
        *,
        params: Sequence[Tensor] | None,
        every: int,
        name: str,
    ) -> None:
        super().__init__(every=every, name=name)
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self._params = list(params) if params is not None else None
        self._op: HessianOperator | None = None
        self.counter: CountingOperator | None = None

    @property
    def params(self) -> list[Tensor]:
        """The chosen parameters (default: the model's trainable ones)."""
        if self._params is not None:
            return self._params
        return super().params

    def validate(self, optimizer: torch.optim.Optimizer) -> None:
        """Default checks, then build the Hessian operator on the probe batch."""
        if not self.params:
            raise ParameterError(f"monitor {self.name!r}: no parameter requires grad")
        super().validate(optimizer)
        assert self.model is not None and self.data is not None
        self._op = HessianOperator(self.model, self.loss_fn, tuple(self.data), params=self.params)
        self.counter = CountingOperator(self._op)

    @property
    def operator(self) -> HessianOperator:
        """The Hessian operator (available after attach)."""
        if self._op is None:
            raise RuntimeError(f"monitor {self.name!r} is not attached yet; call attach() first")
        return self._op

    def _matvecs_since(self, start: int) -> int:
        assert self.counter is not None
        return self.counter.num_matvecs - start
