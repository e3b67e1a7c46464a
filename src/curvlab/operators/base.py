"""The one linear-operator abstraction every curvature matrix in curvlab is.

An operator is a matrix known only through its products. A subclass implements one method,
``_matmat(V)`` for ``V`` of shape ``[n, k]``, and declares ``is_symmetric`` / ``is_psd``; this base
class gives everything else: ``A @ v`` and ``A @ V``, ``v @ A``, ``A.T``, ``to_dense()``,
``to_scipy()``, sums, scalar multiples and compositions.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import (
    DTypeError,
    InvalidArgumentError,
    NoExactDiagonalError,
    ShapeMismatchError,
)
from curvlab.operators._checks import check_positive_int

__all__ = ["DenseOperator", "LinearOperator", "as_operator"]


class LinearOperator:
    """A linear map ``R^n -> R^m`` known through matrix products.

    Attributes:
        shape: ``(m, n)``.
        dtype: the dtype products are computed and returned in.
        device: where products are computed and returned.
        is_symmetric: whether ``A = Aᵀ`` (estimators such as :func:`curvlab.eigsh` require it).
        is_psd: whether ``A`` is positive semi-definite (GGN and Fisher matrices are).

    Vectors of another dtype or device are converted on the way in; results always come back in
    ``self.dtype`` on ``self.device``.

    Example:
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
        >>> (A @ torch.ones(2)).tolist()
        [3.0, 4.0]
        >>> (A.T @ torch.eye(2)).shape
        torch.Size([2, 2])
    """

    is_symmetric: bool = False
    is_psd: bool = False

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        if not (dtype.is_floating_point or dtype.is_complex):
            raise DTypeError(
                f"an operator computes in a floating-point dtype, got {dtype}; convert the matrix "
                "or model first, e.g. A.double() or model.float()"
            )
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.device = torch.device(device)

    # -- what a subclass implements -------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for ``V`` of shape ``[n, k]`` (already in dtype and device)."""
        raise NotImplementedError

    def _rmatmat(self, V: Tensor) -> Tensor:
        """Return ``Aᵀ @ V`` for ``V`` of shape ``[m, k]``; symmetric operators reuse ``_matmat``."""
        if self.is_symmetric:
            return self._matmat(V)
        raise NotImplementedError(f"{type(self).__name__} does not implement transposed products")

    def exact_diagonal(self) -> Tensor:
        """The exact diagonal, for operators that know it without products (``[n]``).

        Dense matrices, the GGN, and scaled, summed, transposed or counted wrappers of those
        provide it; every other operator raises.

        Raises:
            NoExactDiagonalError: this operator has no exact diagonal.
        """
        raise NoExactDiagonalError(
            f"{type(self).__name__} has no exact diagonal; use method='hutchinson', or a "
            "GGNOperator (whose diagonal equals the Hessian's for piecewise-linear networks)"
        )

    def _parts(self) -> tuple[LinearOperator, ...]:
        """The operators this one is built from (sums, scalings, products, transposes)."""
        return ()

    @contextlib.contextmanager
    def fixed(self, *, check_products: bool = True) -> Iterator[None]:
        """A block within which the matrix is taken as fixed: an estimator's run of products.

        Operators that check at every product whether their matrix changed (curvature operators
        follow parameter updates) check once on entry instead; composite operators pass the
        block on to their parts; others need nothing.

        Args:
            check_products: ``False`` when the caller checks what it computes from the products
                for NaN/inf itself (see :func:`~curvlab.estimators._common.check_samples`): a
                curvature operator then skips its pass over each product. Composite operators
                keep their parts' checks.
        """
        with contextlib.ExitStack() as stack:
            for part in self._parts():
                stack.enter_context(part.fixed())
            yield

    # -- products -------------------------------------------------------------------------------
    def _prepare(self, x: Tensor, rows: int) -> tuple[Tensor, bool]:
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.ndim not in (1, 2) or x.shape[0] != rows:
            raise ShapeMismatchError(
                f"expected a vector of shape [{rows}] or a matrix of shape [{rows}, k], "
                f"got {tuple(x.shape)}"
            )
        is_vector = x.ndim == 1
        x = x.to(dtype=self.dtype, device=self.device)
        return (x.unsqueeze(1) if is_vector else x), is_vector

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for a vector ``[n]`` or a matrix ``[n, k]``."""
        M, is_vector = self._prepare(V, self.shape[1])
        out = self._matmat(M) if M.shape[1] > 0 else M.new_zeros(self.shape[0], 0)
        return out.squeeze(1) if is_vector else out

    def _probe_products(self, rows: Tensor) -> Tensor:
        """``z ⊙ Az`` for each probe ``z``, a row of ``rows`` ``[c, n]`` (in dtype and device).

        What Hutchinson's estimators sum (``zᵀAz``, per block); an operator may compute it
        without writing ``Az`` out first.
        """
        return rows * self.matmat(rows.T).T

    def _probe_quadratics(self, rows: Tensor) -> Tensor:
        """``zᵀAz`` for each probe ``z``, a row of ``rows`` ``[c, n]``: what Hutchinson's trace sums.

        An operator may compute it without writing ``z ⊙ Az`` out (the sum of
        :meth:`_probe_products`, the same number up to the order of the additions).
        """
        return self._probe_products(rows).sum(dim=1)

    def rmatmat(self, V: Tensor) -> Tensor:
        """Return ``Aᵀ @ V`` for a vector ``[m]`` or a matrix ``[m, k]``."""
        M, is_vector = self._prepare(V, self.shape[0])
        out = self._rmatmat(M) if M.shape[1] > 0 else M.new_zeros(self.shape[1], 0)
        return out.squeeze(1) if is_vector else out

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _ProductOperator(self, other)
        return self.matmat(other)

    def __rmatmul__(self, other: Any) -> Tensor:
        # v @ A = (Aᵀ v)ᵀ ; V @ A with V [k, m] = (Aᵀ Vᵀ)ᵀ
        if not isinstance(other, Tensor):
            other = torch.as_tensor(np.asarray(other))
        if other.ndim == 1:
            return self.rmatmat(other)
        return self.rmatmat(other.T).T

    @property
    def T(self) -> LinearOperator:
        """The transposed operator (the operator itself when symmetric)."""
        return self if self.is_symmetric else _TransposedOperator(self)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        return _SumOperator(self, _operand(other, "+"))

    def __mul__(self, scalar: float) -> LinearOperator:
        if not isinstance(scalar, (numbers.Real, Tensor)) or (
            isinstance(scalar, Tensor) and scalar.numel() != 1
        ):
            raise InvalidArgumentError(
                f"an operator can be multiplied by a number, got {type(scalar).__name__}; "
                "use A @ B for the product of two operators"
            )
        return _ScaledOperator(self, float(scalar))

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return _ScaledOperator(self, -1.0)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return _SumOperator(self, -_operand(other, "-"))

    # -- conversions ----------------------------------------------------------------------------
    def to_dense(self, chunk_size: int = 256) -> Tensor:
        """Materialise the matrix with ``n`` products against the identity, ``chunk_size`` at a time."""
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        n = self.shape[1]
        cols = []
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self.matmat(E))
        return torch.cat(cols, dim=1) if cols else torch.zeros(self.shape, dtype=self.dtype)

    def to_scipy(self, dtype: Any = np.float64) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` view (numpy in, numpy out).

        Each product converts numpy -> torch -> numpy (and host <-> device): convenient for
        interop, slower than the torch-native estimators of :mod:`curvlab.estimators`.
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        def matmat(X: np.ndarray) -> np.ndarray:
            out = self.matmat(torch.from_numpy(np.ascontiguousarray(X)))
            return out.detach().cpu().numpy().astype(dtype, copy=False)

        def rmatmat(X: np.ndarray) -> np.ndarray:
            out = self.rmatmat(torch.from_numpy(np.ascontiguousarray(X)))
            return out.detach().cpu().numpy().astype(dtype, copy=False)

        return ScipyLinearOperator(
            shape=self.shape,
            dtype=np.dtype(dtype),
            matvec=matmat,
            rmatvec=rmatmat,
            matmat=matmat,
            rmatmat=rmatmat,
        )

    def inverse(self, damping: float = 0.0, **solve_options: Any) -> LinearOperator:
        """``(A + damping·I)⁻¹`` as an operator whose products are :func:`curvlab.solve` calls.

        ``solve_options``: ``method`` (``"cg"`` default, ``"minres"``, ``"neumann"``), ``tol``
        (default 1e-10), ``max_matvecs``. A product raises ``NotConvergedError`` when a solve
        misses ``tol``. (Built in :mod:`curvlab.estimators.solve`, imported on first use.)
        """
        from curvlab.estimators.solve import InverseOperator

        return InverseOperator(self, damping, **solve_options)

    def __repr__(self) -> str:
        flags = [f for f, on in (("symmetric", self.is_symmetric), ("psd", self.is_psd)) if on]
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device}"
            + (", " + ", ".join(flags) if flags else "")
            + ")"
        )


class DenseOperator(LinearOperator):
    """An operator backed by an explicit matrix (used in tests, docs and small problems).

    Args:
        matrix: a ``[m, n]`` tensor.
        symmetric: declare symmetry; ``None`` checks ``matrix`` against its transpose.
        psd: declare positive semi-definiteness (not checked).
    """

    def __init__(self, matrix: Tensor, symmetric: bool | None = None, psd: bool = False) -> None:
        if matrix.ndim != 2:
            raise ShapeMismatchError(
                f"a dense operator needs a 2-D matrix, got {tuple(matrix.shape)}"
            )
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)  # type: ignore[arg-type]
        self.matrix = matrix
        if symmetric is None:
            symmetric = matrix.shape[0] == matrix.shape[1] and bool(
                torch.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-12)
            )
        self.is_symmetric = symmetric
        self.is_psd = psd

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.matrix.T @ V

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        """A copy of the backing matrix (no products needed)."""
        return self.matrix.clone()

    def exact_diagonal(self) -> Tensor:
        """The backing matrix's diagonal."""
        return self.matrix.diagonal().clone()


def as_operator(A: LinearOperator | Tensor) -> LinearOperator:
    """Return ``A`` itself if it is an operator, or a :class:`DenseOperator` wrapping a tensor."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    raise InvalidArgumentError(
        f"expected a curvlab LinearOperator or a 2-D torch.Tensor, got {type(A).__name__}"
    )


def _operand(other: Any, op: str) -> LinearOperator:
    if not isinstance(other, LinearOperator):
        raise InvalidArgumentError(
            f"A {op} B needs two operators, got {type(other).__name__}; wrap a matrix with "
            "as_operator(M)"
        )
    return other


class _TransposedOperator(LinearOperator):
    def __init__(self, op: LinearOperator) -> None:
        super().__init__((op.shape[1], op.shape[0]), op.dtype, op.device)
        self.op = op
        self.is_symmetric = op.is_symmetric
        self.is_psd = op.is_psd

    def _parts(self) -> tuple[LinearOperator, ...]:
        return (self.op,)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op._rmatmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.op._matmat(V)

    @property
    def T(self) -> LinearOperator:
        """The original operator."""
        return self.op

    def exact_diagonal(self) -> Tensor:
        """The diagonal of ``Aᵀ``: that of ``A``."""
        return self.op.exact_diagonal()


class _SumOperator(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape != b.shape:
            raise ShapeMismatchError(f"cannot add operators of shapes {a.shape} and {b.shape}")
        super().__init__(a.shape, a.dtype, a.device)
        self.a, self.b = a, b
        self.is_symmetric = a.is_symmetric and b.is_symmetric
        self.is_psd = a.is_psd and b.is_psd

    def _parts(self) -> tuple[LinearOperator, ...]:
        return (self.a, self.b)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.a.matmat(V) + self.b.matmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.a.rmatmat(V) + self.b.rmatmat(V)

    def exact_diagonal(self) -> Tensor:
        """``diag(A + B) = diag(A) + diag(B)``, when both are known."""
        return self.a.exact_diagonal() + self.b.exact_diagonal()


class _ScaledOperator(LinearOperator):
    def __init__(self, op: LinearOperator, scalar: float) -> None:
        super().__init__(op.shape, op.dtype, op.device)
        self.op, self.scalar = op, scalar
        self.is_symmetric = op.is_symmetric
        self.is_psd = op.is_psd and scalar >= 0

    def _parts(self) -> tuple[LinearOperator, ...]:
        return (self.op,)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scalar * self.op.matmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.scalar * self.op.rmatmat(V)

    def exact_diagonal(self) -> Tensor:
        """``diag(cA) = c diag(A)``."""
        return self.scalar * self.op.exact_diagonal()


class _ProductOperator(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape[1] != b.shape[0]:
            raise ShapeMismatchError(f"cannot compose operators of shapes {a.shape} and {b.shape}")
        super().__init__((a.shape[0], b.shape[1]), a.dtype, a.device)
        self.a, self.b = a, b

    def _parts(self) -> tuple[LinearOperator, ...]:
        return (self.a, self.b)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.a.matmat(self.b.matmat(V))

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.b.rmatmat(self.a.rmatmat(V))

    def exact_diagonal(self) -> Tensor:
        """Refused: the diagonal of ``AB`` does not follow from those of ``A`` and ``B``."""
        raise NoExactDiagonalError(
            "the diagonal of a product A @ B does not follow from the diagonals of A and B; use "
            "method='hutchinson' (curvlab.diagonal(op)), or op.to_dense().diagonal() when n is small"
        )
