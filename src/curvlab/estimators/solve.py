r"""Linear solves with a curvature operator: ``(A + δI) x = b`` by CG, MINRES or a Neumann series.

Three Krylov-type methods, each using only products ``A @ V``:

* ``"cg"`` — conjugate gradients (Hestenes & Stiefel 1952) for symmetric positive definite systems
  (GGN, Fisher, a damped Hessian at a minimum). After ``j`` products the error in the
  ``(A + δI)``-norm has shrunk by at most :math:`2\big((\sqrt\kappa-1)/(\sqrt\kappa+1)\big)^j`, so
  :math:`j \le \lceil \tfrac12\sqrt\kappa \,\log(2/\varepsilon)\rceil` products reach a relative
  A-norm error ε (Saad, *Iterative Methods for Sparse Linear Systems*, 2003, Thm. 6.29). The
  relative residual this module stops on is at most √κ times that error. Each iteration checks the
  curvature :math:`p^\top (A+\delta I) p` of its search direction: a value ``<= 0`` proves the
  system is not positive definite, and CG stops with :class:`~curvlab.errors.IndefiniteSystemError`
  carrying that direction (never a silent wrong answer).
* ``"minres"`` — MINRES (Paige & Saunders 1975) for symmetric indefinite, possibly singular,
  systems (a Hessian at a saddle): it minimises ``‖b − (A+δI) x‖`` over the Krylov space.
* ``"neumann"`` — the truncated Neumann series
  :math:`x_J = \alpha\sum_{j<J} (I - \alpha(A+\delta I))^j b`, i.e. Richardson iteration
  :math:`x \leftarrow x + \alpha(b - (A+\delta I)x)`: the inverse-Hessian-vector estimator of
  implicit differentiation (Lorraine, Vicol & Duvenaud 2020, "Optimizing Millions of
  Hyperparameters by Implicit Differentiation", arXiv 1911.02590). It converges iff
  ``‖I − α(A+δI)‖ < 1``, i.e. all eigenvalues in ``(0, 2/α)``; ``scale=α`` defaults to
  ``1/λ_max`` from a short Lanczos run.

A block right-hand side ``b`` of shape ``[n, k]`` is solved column-wise, all columns at once: one
``A @ P`` product per iteration over the columns that have not converged yet (CG and Neumann);
MINRES runs the columns one after another. ``num_matvecs`` counts products column by column, as
:class:`~curvlab.operators.CountingOperator` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.errors import IndefiniteSystemError, InvalidArgumentError, NotConvergedError
from curvlab.estimators._common import symmetric_operator
from curvlab.operators._checks import check_choice, check_positive_float, check_positive_int
from curvlab.operators.base import LinearOperator

__all__ = ["InverseOperator", "Solution", "solve"]

_METHODS = ("cg", "minres", "neumann")

Preconditioner = LinearOperator | Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Solution:
    """The result of :func:`solve`.

    Attributes:
        x: the solution, shaped like ``b`` (``[n]`` or ``[n, k]``).
        residual_norm: ``‖b − (A + δI) x‖`` per column (a 0-d tensor for a vector ``b``, ``[k]``
            for a block), as tracked by the method's recurrence.
        num_matvecs: operator products spent (one per column per product).
        converged: whether every column reached ``residual_norm <= tol · ‖b‖``.
    """

    x: Tensor
    residual_norm: Tensor
    num_matvecs: int
    converged: bool


def _check_damping(damping: float) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise InvalidArgumentError(f"damping must be a number >= 0, got {damping!r}")
    if not (math.isfinite(damping) and damping >= 0):
        raise InvalidArgumentError(
            f"damping must be finite and >= 0, got {damping}; a negative damping shifts the "
            "spectrum towards indefiniteness — pass damping=0 or a small positive number"
        )
    return float(damping)


@dataclass(frozen=True)
class _System:
    """The matrix ``A + δI`` of the system and the relative residual ``tol`` a column stops at."""

    op: LinearOperator
    damping: float
    tol: float

    def apply(self, V: Tensor) -> Tensor:
        """``(A + δI) V`` for ``V`` of shape ``[n, k]``."""
        out = self.op.matmat(V)
        return out.add(V, alpha=self.damping) if self.damping else out

    def start(self, B: Tensor, X: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(‖b‖ per column, the residual b − (A+δI)x₀, products spent)``; no product when x₀ = 0."""
        if bool(X.any()):
            return B.norm(dim=0), B - self.apply(X), B.shape[1]
        return B.norm(dim=0), B.clone(), 0


def _precondition(M: Preconditioner | None, R: Tensor) -> Tensor:
    if M is None:
        return R
    if isinstance(M, LinearOperator):
        return M.matmat(R)
    return torch.stack([M(R[:, j]) for j in range(R.shape[1])], dim=1)


def _cg(
    system: _System, B: Tensor, X: Tensor, budget: int, M: Preconditioner | None
) -> tuple[Tensor, Tensor, int]:
    """Column-wise (preconditioned) CG; returns ``(X, residual norms, products)``."""
    tol = system.tol
    bnorm, R, used = system.start(B, X)
    Z = _precondition(M, R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    active = R.norm(dim=0) > tol * bnorm
    while bool(active.any()) and used + int(active.sum()) <= budget:
        cols = active.nonzero().flatten()
        AP = system.apply(P[:, cols])
        used += len(cols)
        curv = (P[:, cols] * AP).sum(0)
        pnorm = P[:, cols].norm(dim=0)
        # pᵀAp <= 0 proves indefiniteness; a cosine(p, Ap) below √eps (impossible for a positive
        # definite matrix with κ < 1/eps: the cosine is >= 2√κ/(κ+1)) flags a singular system
        bad = curv <= math.sqrt(torch.finfo(B.dtype).eps) * pnorm * AP.norm(dim=0)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            direction = P[:, cols[j]] / pnorm[j]
            rayleigh = float(curv[j] / pnorm[j] ** 2)
            raise IndefiniteSystemError(
                f"CG met a direction of non-positive curvature pᵀ(A + δI)p / pᵀp = {rayleigh:.3g} "
                f"after {used} products: the system is not positive definite. Use "
                "method='minres' for indefinite or singular systems, or add damping larger than "
                "-λ_min; the direction is in this error's .direction",
                direction=direction,
                curvature=rayleigh,
                num_matvecs=used,
            )
        alpha = rz[cols] / curv
        X[:, cols] += alpha * P[:, cols]
        R[:, cols] -= alpha * AP
        Zc = _precondition(M, R[:, cols])
        rz_new = (R[:, cols] * Zc).sum(0)
        P[:, cols] = Zc + (rz_new / rz[cols]) * P[:, cols]
        rz[cols] = rz_new
        active[cols] = R[:, cols].norm(dim=0) > tol * bnorm[cols]
    return X, R.norm(dim=0), used


def _minres(system: _System, b: Tensor, x: Tensor, budget: int) -> tuple[Tensor, Tensor, int]:
    """MINRES (Paige & Saunders 1975, unpreconditioned) for one column."""
    used = 0
    if bool(x.any()):
        r1 = b - system.apply(x.unsqueeze(1)).squeeze(1)
        used = 1
    else:
        r1 = b.clone()
    beta = r1.norm()
    stop = system.tol * b.norm()
    phibar = beta
    if float(beta) <= float(stop):
        return x, phibar, used
    y, r2 = r1.clone(), r1.clone()
    oldb = torch.zeros_like(beta)
    dbar = epsln = torch.zeros_like(beta)
    cs, sn = -torch.ones_like(beta), torch.zeros_like(beta)
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    tiny = torch.finfo(b.dtype).eps
    while used < budget:
        v = y / beta
        y = system.apply(v.unsqueeze(1)).squeeze(1)
        used += 1
        if float(oldb) > 0:
            y = y - (beta / oldb) * r1
        alfa = v @ y
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        oldb, beta = beta, y.norm()
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar**2 + beta**2).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        if float(phibar) <= float(stop) or float(beta) <= tiny * float(b.norm()):
            break
    return x, phibar, used


def _neumann(
    system: _System, B: Tensor, X: Tensor, budget: int, scale: float
) -> tuple[Tensor, Tensor, int]:
    """Richardson iteration ``x ← x + α (b − (A+δI) x)`` = the truncated Neumann series."""
    tol = system.tol
    bnorm, R, used = system.start(B, X)
    active = R.norm(dim=0) > tol * bnorm
    while bool(active.any()) and used + int(active.sum()) <= budget:
        cols = active.nonzero().flatten()
        X[:, cols] += scale * R[:, cols]
        R[:, cols] = B[:, cols] - system.apply(X[:, cols])
        used += len(cols)
        rn = R[:, cols].norm(dim=0)
        if bool((rn > 1e3 * bnorm[cols]).any()) or not bool(torch.isfinite(rn).all()):
            raise InvalidArgumentError(
                f"the Neumann series diverges with scale={scale:.3g} (‖I − α(A + δI)‖ >= 1): pass "
                "a smaller scale (α < 2/λ_max), or the operator is not positive definite — use "
                "method='minres' for indefinite systems"
            )
        active[cols] = rn > tol * bnorm[cols]
    return X, R.norm(dim=0), used


def solve(
    op: LinearOperator | Tensor,
    b: Tensor,
    *,
    damping: float = 0.0,
    method: str = "cg",
    tol: float = 1e-8,
    max_matvecs: int | None = None,
    preconditioner: Preconditioner | None = None,
    x0: Tensor | None = None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> Solution:
    r"""Solve :math:`(A + \delta I)\,x = b` for a symmetric operator ``A`` with products only.

    See the module docstring for the three methods and their guarantees.

    Args:
        op: a symmetric :class:`~curvlab.operators.LinearOperator` (or a dense symmetric tensor).
        b: right-hand side, ``[n]`` or a block ``[n, k]`` (solved column-wise, see the module).
        damping: δ >= 0 added to the diagonal (Levenberg-Marquardt / Tikhonov damping).
        method: ``"cg"`` (positive definite), ``"minres"`` (indefinite or singular) or
            ``"neumann"`` (truncated Neumann series).
        tol: stop a column when ``‖b − (A+δI)x‖ <= tol · ‖b‖``.
        max_matvecs: product budget over all columns (default ``10 n`` per column for CG and
            MINRES, ``100 n`` for Neumann); when it runs out the current iterate comes back with
            ``converged=False``.
        preconditioner: ``M ≈ (A + δI)⁻¹`` for preconditioned CG, an operator or a callable on
            ``[n]`` vectors (symmetric positive definite; only with ``method="cg"``).
        x0: start vector (same shape as ``b``; default zero).
        scale: the Neumann series' step α (default ``1 / λ_max(A + δI)`` from
            :func:`~curvlab.eigsh`, whose products are counted).
        generator: source of that Lanczos run's start vector.

    Returns:
        :class:`Solution` ``(x, residual_norm, num_matvecs, converged)``.

    Raises:
        NotSymmetricError: the operator is not declared symmetric.
        InvalidArgumentError: damping < 0, a non-positive ``tol``/``scale``/``max_matvecs``, a
            preconditioner with a method other than CG, or a diverging Neumann series.
        ShapeMismatchError: ``b`` or ``x0`` does not fit the operator.
        IndefiniteSystemError: CG met a direction of non-positive curvature (its ``.direction``
            holds it): the system is indefinite or singular.
        UnknownOptionError: an unknown ``method``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> sol = solve(A, torch.tensor([1.0, 2.0], dtype=torch.float64), tol=1e-12)
        >>> [round(v, 6) for v in sol.x.tolist()], sol.num_matvecs, sol.converged
        ([0.090909, 0.636364], 2, True)
    """
    A = symmetric_operator(op, "solve")
    check_choice(method, _METHODS, "solve method")
    damping = _check_damping(damping)
    tol = check_positive_float(tol, "tol")
    if preconditioner is not None and method != "cg":
        raise InvalidArgumentError(
            f"a preconditioner is supported by method='cg' only, got method={method!r}"
        )
    B, is_vector = A._prepare(b, A.shape[0])
    n, k = B.shape
    budget = (
        check_positive_int(max_matvecs, "max_matvecs")
        if max_matvecs is not None
        else (100 if method == "neumann" else 10) * n * k
    )
    X = torch.zeros_like(B) if x0 is None else A._prepare(x0, n)[0].clone()
    if X.shape != B.shape:
        raise InvalidArgumentError(f"x0 has shape {tuple(X.shape)}, b has {tuple(B.shape)}")
    system = _System(A, damping, tol)
    extra = 0
    if method == "cg":
        X, res, used = _cg(system, B, X, budget, preconditioner)
    elif method == "minres":
        cols, norms, used = [], [], 0
        for j in range(k):
            xj, rj, uj = _minres(system, B[:, j], X[:, j], budget - used)
            cols.append(xj)
            norms.append(rj)
            used += uj
        X, res = torch.stack(cols, dim=1), torch.stack(norms)
    else:
        if scale is None:
            from curvlab.estimators.eigen import eigsh

            top = eigsh(A, k=1, tol=1e-2, generator=generator)
            extra = top.num_matvecs
            scale = 1.0 / (float(top.values[0]) * 1.01 + damping)
        scale = check_positive_float(scale, "scale")
        X, res, used = _neumann(system, B, X, budget, scale)
    converged = bool((res <= tol * B.norm(dim=0)).all())
    if is_vector:
        X, res = X.squeeze(1), res.squeeze(0)
    return Solution(X, res, used + extra, converged)


class InverseOperator(LinearOperator):
    """``(A + δI)⁻¹`` as an operator: each product is a :func:`solve`.

    Built by :meth:`LinearOperator.inverse`. Symmetric (and positive definite when ``A`` is);
    ``num_matvecs`` accumulates the products of ``A`` spent by all solves so far.

    Raises (on a product):
        NotConvergedError: a solve did not reach ``tol`` within ``max_matvecs``.
        IndefiniteSystemError: CG met negative curvature (see :func:`solve`).
    """

    is_symmetric = True

    def __init__(
        self,
        op: LinearOperator,
        damping: float = 0.0,
        *,
        method: str = "cg",
        tol: float = 1e-10,
        max_matvecs: int | None = None,
    ) -> None:
        symmetric_operator(op, "inverse")
        check_choice(method, _METHODS, "solve method")
        super().__init__(op.shape, op.dtype, op.device)
        self.op = op
        self.damping = _check_damping(damping)
        self.method = method
        self.tol = check_positive_float(tol, "tol")
        self.max_matvecs = max_matvecs
        self.is_psd = op.is_psd
        self.num_matvecs = 0

    def _parts(self) -> tuple[LinearOperator, ...]:
        return (self.op,)

    def _matmat(self, V: Tensor) -> Tensor:
        sol = solve(
            self.op,
            V,
            damping=self.damping,
            method=self.method,
            tol=self.tol,
            max_matvecs=self.max_matvecs,
        )
        self.num_matvecs += sol.num_matvecs
        if not sol.converged:
            raise NotConvergedError(
                f"the {self.method} solve inside {type(self).__name__} stopped at relative "
                f"residual {float((sol.residual_norm / V.norm(dim=0)).max()):.3g} > tol = "
                f"{self.tol:g} after {sol.num_matvecs} products: raise max_matvecs or damping"
            )
        return sol.x
