"""A wrapper that counts the products taken through an operator (for budgets and tests)."""

from __future__ import annotations

from torch import Tensor

from curvlab.operators.base import LinearOperator

__all__ = ["CountingOperator"]


class CountingOperator(LinearOperator):
    """Wrap ``op`` and count matrix-vector products, one per column of every ``@``.

    Example:
        >>> import torch
        >>> from curvlab.operators.base import DenseOperator
        >>> A = CountingOperator(DenseOperator(torch.eye(3)))
        >>> _ = A @ torch.ones(3, 2)
        >>> A.num_matvecs
        2
    """

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.shape, op.dtype, op.device)
        self.op = op
        self.is_symmetric = op.is_symmetric
        self.is_psd = op.is_psd
        self.num_matvecs = 0
        self.num_calls = 0

    def _parts(self) -> tuple[LinearOperator, ...]:
        return (self.op,)

    def _matmat(self, V: Tensor) -> Tensor:
        self.num_matvecs += V.shape[1]
        self.num_calls += 1
        return self.op.matmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        self.num_matvecs += V.shape[1]
        self.num_calls += 1
        return self.op.rmatmat(V)

    def exact_diagonal(self) -> Tensor:
        """The wrapped operator's exact diagonal (no product is counted)."""
        return self.op.exact_diagonal()

    def reset(self) -> None:
        """Set the counters back to zero."""
        self.num_matvecs = 0
        self.num_calls = 0
