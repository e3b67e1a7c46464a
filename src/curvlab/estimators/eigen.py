"""Extreme eigenpairs of a symmetric operator: Lanczos (thick-restarted) and power iteration."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import InvalidArgumentError, ShapeMismatchError
from curvlab.estimators._common import check_samples, symmetric_operator
from curvlab.estimators.results import Eigenpairs
from curvlab.operators._checks import check_choice, check_positive_float, check_positive_int
from curvlab.operators._context import in_full_precision
from curvlab.operators.base import LinearOperator

__all__ = ["eigsh", "lanczos_step", "power_iteration"]

_WHICH = ("LA", "SA", "LM")


def _order(theta: list[float], which: str) -> list[int]:
    """Positions of ``theta`` in the order ``which`` wants, ties by position (a stable sort).

    A Python sort of a list: checked every step on a handful of Ritz values, where
    ``np.argsort`` costs ten times as much. NaN (a non-finite product that was not raised) goes
    last, as ``np.argsort`` puts it.
    """
    if which == "LA":
        key = [-t for t in theta]
    elif which == "SA":
        key = theta
    else:
        key = [-abs(t) for t in theta]
    if any(t != t for t in key):
        return np.argsort(key, kind="stable").tolist()  # type: ignore[no-any-return]
    return sorted(range(len(key)), key=key.__getitem__)


def _start_vector(
    op: LinearOperator, v0: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    n = op.shape[0]
    if v0 is not None:
        v = torch.as_tensor(v0).to(dtype=op.dtype, device=op.device).reshape(-1)
        if v.shape[0] != n:
            raise ShapeMismatchError(f"v0 has {v.shape[0]} entries, the operator has n = {n}")
        if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
            raise ShapeMismatchError("v0 must be a finite, non-zero vector")
    else:
        dev = generator.device if generator is not None else torch.device("cpu")
        v = torch.randn(n, generator=generator, dtype=op.dtype, device=dev).to(op.device)
    return v / v.norm()


def _check_k_and_tol(k: int, n: int, tol: float, budget: int | None, name: str) -> None:
    """Validate the number of eigenpairs, the tolerance and the product budget."""
    check_positive_int(k, "k")
    if k > n:
        raise InvalidArgumentError(
            f"k = {k} eigenpairs requested from an operator of dimension n = {n}; pass k <= n"
        )
    check_positive_float(tol, "tol")
    if budget is not None:
        check_positive_int(budget, name)


def _orthogonalise(V: Tensor, w: Tensor) -> Tensor:
    """Project ``w`` off the columns of ``V`` twice (classical Gram-Schmidt, CGS2)."""
    h = V.T @ w
    w = w - V @ h
    h2 = V.T @ w
    return w - V @ h2


def _orthogonalise_rows(B: Tensor, w: Tensor) -> Tensor:
    """Project ``w`` off the rows of ``B`` twice (CGS2); rows are contiguous, so this is two
    streaming passes over ``B`` (the column layout ``n × m`` was 5x slower for n = 52k)."""
    w = torch.addmv(w, B.T, B @ w, alpha=-1.0)
    return torch.addmv(w, B.T, B @ w, alpha=-1.0)


@in_full_precision
def eigsh(
    A: LinearOperator | Tensor,
    k: int = 1,
    which: str = "LA",
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    max_iter: int | None = None,
    max_basis: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Eigenpairs:
    r"""``k`` extreme eigenpairs of a symmetric operator by thick-restarted Lanczos.

    The Krylov basis :math:`V_m` is kept orthonormal by full re-orthogonalisation (CGS2), so
    :math:`A V_m = V_m T_m + \beta_m v_{m+1} e_m^\top` holds to rounding. After every product the
    Ritz pairs :math:`(\theta_i, V_m s_i)` of :math:`T_m` are checked: the residual of pair ``i`` is
    :math:`r_i = \beta_m |e_m^\top s_i| = \|A y_i - \theta_i y_i\|`, and it stops as soon as the ``k``
    wanted pairs satisfy :math:`r_i \le \mathrm{tol}\cdot\max(|\theta_i|, \epsilon^{2/3}\|T\|)`
    (ARPACK's criterion). For a symmetric operator each :math:`\theta_i` is then within
    :math:`r_i` of an eigenvalue, and typically within :math:`r_i^2/\mathrm{gap}`, so the default
    ``tol=1e-3`` usually gives eigenvalues to ~1e-6 relative. When the basis reaches ``max_basis``
    vectors it restarts thickly (Wu & Simon 2000): it keeps the best Ritz vectors and continues
    from the residual direction, so memory stays ``n × max_basis``. The basis is allocated as it
    grows (8 vectors, then doubling up to ``max_basis + 1``), so a run that converges in ``j``
    steps holds at most ``2j`` basis vectors. An exhausted Krylov space
    (breakdown) continues from a fresh random direction, so ``k = n`` recovers the whole spectrum.

    Args:
        A: a symmetric :class:`~curvlab.operators.LinearOperator` or a dense symmetric tensor.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic (top), ``"SA"`` smallest algebraic (most negative),
            ``"LM"`` largest magnitude.
        tol: relative residual tolerance (above).
        max_iter: alias of ``max_matvecs`` (each Lanczos iteration is one product).
        max_matvecs: product budget (default ``max(300, 30 k)``, at most ``10 n``); when it runs
            out the best pairs so far are returned with ``converged=False``.
        max_basis: Krylov basis size before a restart (default ``min(n, max(2k + 20, 30))``).
        v0: start vector (warm start, e.g. the previous top eigenvector); random if ``None``.
        generator: source of the random start (and restart) vectors.

    Returns:
        :class:`~curvlab.estimators.results.Eigenpairs` with values ordered as ``which`` says.

    Raises:
        NotSymmetricError: the operator is not declared symmetric.
        InvalidArgumentError: ``k`` is not an integer in ``[1, n]``; ``tol`` is not finite and
            positive; ``max_matvecs``/``max_iter``/``max_basis`` is not a positive integer.
        UnknownOptionError: ``which`` is not ``"LA"``, ``"SA"`` or ``"LM"``.
        ShapeMismatchError: ``v0`` does not fit.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> [round(x, 8) for x in eigsh(A, k=2, tol=1e-10).values.tolist()]
        [10.0, 9.0]
        >>> [round(x, 8) for x in eigsh(A, k=1, which="SA", tol=1e-10).values.tolist()]
        [1.0]

    References:
        C. Lanczos (1950); K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric
        eigenvalue problems", SIAM J. Matrix Anal. Appl. 22 (2000).
    """
    op = symmetric_operator(A, "eigsh")
    n = op.shape[0]
    check_choice(which, _WHICH, "which")
    if max_iter is not None and max_matvecs is not None and max_iter != max_matvecs:
        raise InvalidArgumentError(
            f"max_matvecs = {max_matvecs} and its alias max_iter = {max_iter} disagree; pass one"
        )
    max_matvecs = max_matvecs if max_matvecs is not None else max_iter
    _check_k_and_tol(k, n, tol, max_matvecs, "max_matvecs")
    budget = max_matvecs if max_matvecs is not None else min(max(300, 30 * k), 10 * n)
    if max_basis is not None:
        check_positive_int(max_basis, "max_basis")
    m_max = min(n, max_basis if max_basis is not None else max(2 * k + 20, 30))
    if m_max < min(n, k + 2):
        raise InvalidArgumentError(
            f"max_basis = {m_max} is too small for k = {k}; use at least k + 2"
        )
    # on the host the products are checked through alpha = vᵀAv, read every step anyway
    with op.fixed(check_products=op.device.type != "cpu"):
        v = _start_vector(op, v0, generator)
        return _lanczos(op, k, which, tol, budget, m_max, v, generator)


def lanczos_step(op: LinearOperator, V: Tensor, j: int) -> tuple[Tensor, Tensor]:
    """One Lanczos step from basis row ``j``, on the device, with no host synchronisation.

    Returns ``A v_j`` orthogonalised against the rows ``V[: j + 1]`` (CGS2) and the tensor
    ``[alpha_j, beta_j]`` (``alpha_j = v_jᵀ A v_j``, ``beta_j`` the norm of the first).
    """
    w = op._matmat(V[j].unsqueeze(1)).squeeze(1)  # the basis is op's dtype and device
    alpha = V[j] @ w
    w = _orthogonalise_rows(V[: j + 1], w)
    return w, torch.stack([alpha, torch.linalg.vector_norm(w)])


@functools.cache
def _dsyevd() -> Callable[..., tuple[np.ndarray, np.ndarray, int]]:
    """SciPy's LAPACK ``dsyevd``, imported on first use (``scipy.linalg`` is 2/3 of the time
    ``import curvlab`` would otherwise take)."""
    from scipy.linalg.lapack import dsyevd

    return dsyevd  # type: ignore[no-any-return]


def _ritz(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the small symmetric ``T``, ascending: LAPACK's ``dsyevd`` called directly
    (a third of ``np.linalg.eigh``'s time at the sizes of a Krylov basis, checked every step)."""
    theta, S, info = _dsyevd()(T, 1, 0)  # compute_v, lower (positional: 15 us less)
    return (theta, S) if info == 0 else np.linalg.eigh(T)


def _grow(V: Tensor, rows: int, cap: int) -> Tensor:
    """``V`` with room for at least ``rows`` rows: doubled, at most ``cap`` (the rows kept)."""
    if rows <= V.shape[0]:
        return V
    grown = V.new_empty(min(max(rows, 2 * V.shape[0]), cap), V.shape[1])
    grown[: V.shape[0]] = V
    return grown


def _lanczos(
    op: LinearOperator,
    k: int,
    which: str,
    tol: float,
    budget: int,
    m_max: int,
    v0: Tensor,
    generator: torch.Generator | None,
) -> Eigenpairs:
    """The thick-restarted Lanczos iteration of :func:`eigsh` (arguments validated there)."""
    n = op.shape[0]
    dtype, device = op.dtype, op.device
    eps23 = float(torch.finfo(dtype).eps) ** (2.0 / 3.0)
    # Krylov basis stored as rows (contiguous vectors): products and CGS2 stream over memory;
    # allocated as it grows, so its memory follows the steps taken
    V = v0.new_empty(min(8, m_max + 1), n)
    T = np.zeros((m_max + 1, m_max + 1))
    V[0] = v0
    j = 0  # index of the basis vector whose product comes next
    matvecs = 0
    anorm = 0.0
    while True:
        w, coefficients = lanczos_step(op, V, j)
        matvecs += 1
        # the iteration's one synchronisation: the convergence check needs alpha and beta
        T[j, j], beta = coefficients.tolist()
        if not math.isfinite(T[j, j]):  # a NaN/inf in A v_j (0 · inf is NaN too)
            check_samples(op, V[j].unsqueeze(0), coefficients[:1])
        m = j + 1
        theta, S = _ritz(T[:m, :m])
        # the test on Python floats (numpy's per-call overhead on a few numbers was ~100 us a
        # step, 4% of a 10k-parameter HVP); the same IEEE operations as on arrays
        ritz = theta.tolist()
        anorm = max(anorm, abs(ritz[0]), abs(ritz[-1]))  # theta ascends
        idx = _order(ritz, which)[: min(k, m)]
        last = S[m - 1].tolist()
        res = [beta * abs(last[i]) for i in idx]
        floor = eps23 * anorm
        done = m >= k and all(r <= tol * max(abs(ritz[i]), floor) for r, i in zip(res, idx))
        exhausted = m == n
        if done or exhausted or matvecs >= budget:
            if exhausted:
                res = [0.0] * len(res) if beta <= 1e-8 * max(anorm, 1.0) else res
                done = done or m >= k
            vecs = V[:m].T @ torch.as_tensor(S[:, idx], dtype=dtype, device=device)
            return Eigenpairs(
                values=torch.as_tensor(theta[idx], dtype=dtype),
                vectors=vecs,
                num_matvecs=matvecs,
                converged=bool(done and m >= k),
                residuals=torch.as_tensor(res, dtype=dtype),
            )
        if beta <= 1e-10 * max(anorm, 1e-30):
            # invariant subspace: continue from a fresh direction orthogonal to the basis
            dev = generator.device if generator is not None else torch.device("cpu")
            r = torch.randn(n, generator=generator, dtype=dtype, device=dev).to(device)
            w = _orthogonalise_rows(V[:m], r)
            w, beta_next = w / w.norm(), 0.0
        else:
            beta_next = beta
        if m < m_max:
            V = _grow(V, m + 1, m_max + 1)
            torch.div(w, beta_next or 1.0, out=V[m])  # normalised straight into the basis
            T[m, m - 1] = T[m - 1, m] = beta_next
            j = m
            continue
        if beta_next:
            w = w / beta_next
        # thick restart: keep the p best Ritz vectors, continue from the residual direction
        p = min(max(k + (m_max - k) // 2, k + 1), m_max - 1)
        keep = _order(ritz, which)[:p]
        Sk = torch.as_tensor(S[:, keep], dtype=dtype, device=device)
        V[:p] = Sk.T @ V[:m]
        V[p] = w
        T[:] = 0
        T[np.arange(p), np.arange(p)] = theta[keep]
        T[p, :p] = T[:p, p] = beta_next * S[m - 1, keep]
        j = p


@in_full_precision
def power_iteration(
    A: LinearOperator | Tensor,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    generator: torch.Generator | None = None,
) -> Eigenpairs:
    r"""``k`` largest-magnitude eigenpairs by deflated power iteration (a baseline for :func:`eigsh`).

    For each ``i``: iterate :math:`v \leftarrow P A v / \|P A v\|` with ``P`` projecting off the
    eigenvectors already found, until the residual :math:`\|Av - \theta v\| \le \mathrm{tol}\,|\theta|`
    (a residual test, not the change of the Rayleigh quotient, which stops early on slow
    convergence). It needs far more products than Lanczos when eigenvalues are close; it is here
    to compare against.

    Args:
        A, k, tol, generator: as :func:`eigsh`.
        max_matvecs: total budget (default ``200 k``).

    Returns:
        :class:`~curvlab.estimators.results.Eigenpairs` ordered by decreasing magnitude.
    """
    op = symmetric_operator(A, "power_iteration")
    _check_k_and_tol(k, op.shape[0], tol, max_matvecs, "max_matvecs")
    budget = max_matvecs if max_matvecs is not None else 200 * k
    found: list[Tensor] = []
    values: list[float] = []
    residuals: list[float] = []
    matvecs = 0
    converged = True
    for _ in range(k):
        v = _start_vector(op, None, generator)
        if found:
            v = _orthogonalise(torch.stack(found, 1), v)
            v = v / v.norm()
        theta, res, ok = 0.0, math.inf, False
        while matvecs < budget:
            w = op.matmat(v)
            matvecs += 1
            if found:
                w = _orthogonalise(torch.stack(found, 1), w)
            theta = float(v @ w)
            res = float((w - theta * v).norm())
            if res <= tol * abs(theta):
                ok = True
                break
            v = w / w.norm()
        converged = converged and ok
        found.append(v)
        values.append(theta)
        residuals.append(res)
    order = np.argsort(-np.abs(values), kind="stable")
    return Eigenpairs(
        values=torch.as_tensor(np.asarray(values)[order], dtype=op.dtype),
        vectors=torch.stack([found[i] for i in order], 1),
        num_matvecs=matvecs,
        converged=converged,
        residuals=torch.as_tensor(np.asarray(residuals)[order], dtype=op.dtype),
    )
