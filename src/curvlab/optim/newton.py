r"""Newton methods with an inexact, matrix-free solve: damped, regularized and saddle-free Newton.

.. math::
   \begin{aligned}
   &\textbf{input}: \gamma \text{ (lr)},\ \delta \text{ (damping)},\ L \text{ (Hessian Lipschitz
       constant, optional)},\ \theta_0 \\
   &\textbf{for } t = 0, 1, \ldots: \quad g \leftarrow \nabla f(\theta_t),\quad
       H v \text{ by double backward through the closure's graph} \\
   &\quad \texttt{damped}: \quad d \leftarrow (H + \delta I)^{-1} g \ \text{(CG/MINRES/Neumann)},
       \quad G \leftarrow \sqrt{g^\top d},\quad
       \alpha \leftarrow \frac{-1 + \sqrt{1 + 2 L G}}{L G} \ (\alpha = 1 \text{ without } L) \\
   &\quad \texttt{regularized}: \quad \lambda \leftarrow \sqrt{L \|g\|},\quad
       d \leftarrow (H + (\lambda + \delta) I)^{-1} g,\quad \alpha = 1 \\
   &\quad \texttt{saddle-free}: \quad V, T \leftarrow k \text{ Lanczos steps of } H
       \text{ from } g,\quad T = S \Theta S^\top,\quad
       d \leftarrow V S\, (|\Theta| + \delta)^{-1} S^\top V^\top g,\quad \alpha = 1 \\
   &\quad \theta_{t+1} \leftarrow \theta_t - \gamma\, \alpha\, d
   \end{aligned}

* ``damped`` — Newton's direction with the step size of AICN, Hanzely, Kamzolov, Pasechnyuk,
  Gasnikov, Richtárik & Takáč, "A Damped Newton Method Achieves Global O(1/k²) and Local
  Quadratic Convergence Rate", NeurIPS 2022 (arXiv 2211.00140), driven by the Newton decrement
  ``G = ‖g‖*_θ``: global :math:`O(1/k^2)` for semi-strongly self-concordant objectives, and
  ``α → 1`` (pure Newton, local quadratic convergence) as ``G → 0``. The seed paper (catalogue
  B19: Hanzely, Abdukhakimov & Takáč, "Newton Method Revisited: Global Convergence Rates up to
  O(k⁻³) for Stepsize Schedules", arXiv 2405.18926) refines the schedule of ``α``; that schedule
  is not implemented here. Without ``hessian_lipschitz`` it is plain (Levenberg-damped) Newton.
* ``regularized`` — the gradient-regularized Newton method of Mishchenko, "Regularized Newton
  Method with Global O(1/k²) Convergence", SIAM J. Optim. 2023 (arXiv 2112.02089), Algorithm 1 with
  ``λ_k = sqrt(H ‖∇f(x_k)‖)``, ``H = hessian_lipschitz``: for convex f with L-Lipschitz Hessian,
  :math:`f(x_k) - f^* = O(L R^3 / k^2)`. With an approximate Hessian this is the
  gradient-normalized method of the seed B21 (exponent 1/2).
* ``saddle-free`` — Dauphin, Pascanu, Gulcehre, Cho, Ganguli & Bengio, "Identifying and attacking
  the saddle point problem in high-dimensional non-convex optimization", NeurIPS 2014 (arXiv
  1406.2572), Algorithm 1: :math:`|H|^{-1} g` in a k-dimensional Krylov subspace (Lanczos with
  full re-orthogonalisation, started from ``g``), so negative-curvature directions are descended
  instead of ascended. The step is restricted to that subspace, as in the paper.

``lr`` multiplies the step (``lr = 1``: full Newton step). The direction is computed jointly over
all param groups (one Hessian); only ``lr`` may differ between groups — the other hyper-parameters
are read from the first group.

Each step runs the closure once (the loss WITHOUT backward, as :mod:`curvlab.optim._closure`),
takes the gradient with ``create_graph=True`` and spends ``num_matvecs`` Hessian-vector products
(double backward through that graph) in the solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.errors import IndefiniteSystemError, ParameterError
from curvlab.estimators.eigen import lanczos_step
from curvlab.estimators.solve import solve
from curvlab.operators._context import full_precision
from curvlab.operators.base import LinearOperator
from curvlab.optim._closure import _call_closure, _loss_grads
from curvlab.optim._validation import (
    check_finite_grads,
    load_state_dict_checked,
    next_step_number,
    validate_lr,
    validate_nonnegative,
    validate_on_nonfinite,
    validate_positive,
)

__all__ = ["Newton", "NewtonDirection", "lanczos_basis", "newton_direction", "newton_single_tensor"]

#: per-parameter state: the step count; on the first parameter, the last step's diagnostics
_STATE_KEYS = ("step", "num_matvecs", "step_size", "decrement")
_METHODS = ("damped", "regularized", "saddle-free")
_SOLVERS = ("cg", "minres", "neumann")


class NewtonDirection(NamedTuple):
    """What :func:`newton_direction` returns: the direction ``d``, the step size ``α`` (the update
    is ``θ ← θ − lr·α·d``), the products spent and the Newton decrement ``sqrt(gᵀd)`` (NaN when
    ``gᵀd < 0``)."""

    direction: Tensor
    step_size: float
    num_matvecs: int
    decrement: float


class _GraphHessian(LinearOperator):
    """The Hessian of the closure's loss in flat coordinates, by double backward (kept graph)."""

    is_symmetric = True

    def __init__(self, params: list[Tensor], grads: list[Tensor]) -> None:
        n = sum(p.numel() for p in params)
        super().__init__((n, n), params[0].dtype, params[0].device)
        self.params, self.grads = params, grads

    def _matmat(self, V: Tensor) -> Tensor:
        cols = []
        for j in range(V.shape[1]):
            pieces = torch.split(V[:, j], [p.numel() for p in self.params])
            outs = [v.view_as(p) for v, p in zip(pieces, self.params)]
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    self.grads, self.params, grad_outputs=outs, retain_graph=True, allow_unused=True
                )
            cols.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if h is None else h).reshape(-1)
                        for h, p in zip(hv, self.params)
                    ]
                )
            )
        return torch.stack(cols, dim=1).detach()


def lanczos_basis(op: LinearOperator, v0: Tensor, steps: int) -> tuple[Tensor, Tensor, int]:
    """``(V [n, m], T [m, m], products)``: ``m <= steps`` Lanczos steps of ``op`` from ``v0``.

    Each step is :func:`curvlab.estimators.eigen.lanczos_step` (full re-orthogonalisation, two
    Gram-Schmidt passes), so ``Vᵀ A V = T`` (tridiagonal) to rounding. It stops early when the
    Krylov space is exhausted (``β_j <= 1e-10·max|α|``; one scalar read per step, cheaper than
    the products it saves), so ``products == m``.
    """
    n = op.shape[0]
    total = min(steps, n)
    V = v0.new_zeros(total, n)
    V[0] = v0 / v0.norm()
    ab = v0.new_zeros(total, 2)  # rows [α_j, β_j]
    m = total
    for j in range(total - 1):
        w, ab[j] = lanczos_step(op, V, j)
        if float(ab[j, 1]) <= 1e-10 * float(ab[: j + 1, 0].abs().max()):
            m = j + 1
            break
        V[j + 1] = w / ab[j, 1]
    else:
        _, ab[total - 1] = lanczos_step(op, V, total - 1)
    T = torch.diag(ab[:m, 0])
    if m > 1:
        T = T + torch.diag(ab[: m - 1, 1], 1) + torch.diag(ab[: m - 1, 1], -1)
    return V[:m].T, T, m


def newton_direction(
    hessian: LinearOperator,
    grad: Tensor,
    *,
    method: str,
    damping: float,
    solver: str,
    tol: float,
    max_matvecs: int | None,
    hessian_lipschitz: float | None,
    krylov_dim: int,
) -> NewtonDirection:
    """The direction and step size of one Newton step (the rule in the module docstring).

    ``hessian``: a symmetric operator (the Hessian at θ); ``grad``: the flat gradient. With the
    ``"cg"`` solver an indefinite ``H + δI`` raises :class:`~curvlab.errors.IndefiniteSystemError`.
    """
    if method == "saddle-free":
        V, T, used = lanczos_basis(hessian, grad, krylov_dim)
        theta, S = torch.linalg.eigh(T)
        coef = S @ ((S.T @ (V.T @ grad)) / (theta.abs() + damping))
        d = V @ coef
        return NewtonDirection(d, 1.0, used, _decrement(grad, d))
    shift = damping
    if method == "regularized":
        assert hessian_lipschitz is not None
        shift += math.sqrt(hessian_lipschitz * float(grad.norm()))
    try:
        sol = solve(hessian, grad, damping=shift, method=solver, tol=tol, max_matvecs=max_matvecs)
    except IndefiniteSystemError as exc:  # say it in the optimizer's keywords, not solve()'s
        raise IndefiniteSystemError(
            f"the Newton system H + {shift:.3g}·I is not positive definite (CG met curvature "
            f"pᵀ(H + δI)p / pᵀp = {exc.curvature:.3g} after {exc.num_matvecs} products): pass "
            'solver="minres" for an indefinite system, method="saddle-free" to step along |H|, '
            "or damping larger than -λ_min; the parameters and the state are unchanged, the "
            "direction is in this error's .direction",
            direction=exc.direction,
            curvature=exc.curvature,
            num_matvecs=exc.num_matvecs,
        ) from exc
    dec = _decrement(grad, sol.x)
    step = 1.0
    if method == "damped" and hessian_lipschitz is not None and dec > 0:
        lg = hessian_lipschitz * dec
        step = (math.sqrt(1.0 + 2.0 * lg) - 1.0) / lg
    return NewtonDirection(sol.x, step, sol.num_matvecs, dec)


def _decrement(grad: Tensor, d: Tensor) -> float:
    gd = float(grad @ d)
    return math.sqrt(gd) if gd >= 0 else float("nan")


def newton_single_tensor(
    params: list[Tensor], direction: Tensor, lrs: list[float], step_size: float
) -> None:
    """``θ_i ← θ_i − lr_i · α · d_i`` for each parameter's slice ``d_i`` of the flat direction."""
    for p, d, lr in zip(params, torch.split(direction, [p.numel() for p in params]), lrs):
        p.add_(d.view_as(p).to(p.dtype), alpha=-lr * step_size)


class Newton(Optimizer):
    r"""Damped, regularized or saddle-free Newton with a matrix-free inexact solve.

    Rule: :math:`\theta \leftarrow \theta - \gamma\,\alpha\,d` with ``d`` from the method (the
    algorithm box and papers are in the module docstring).

    Args:
        params: parameters or param groups (only ``lr`` may differ between groups).
        lr: γ, a multiplier of the Newton step (default 1).
        damping: δ >= 0 added to the Hessian (``saddle-free``: to ``|Θ|``) (default 0).
        method: ``"damped"`` (default), ``"regularized"`` or ``"saddle-free"``.
        solver: ``"cg"`` (default; positive definite systems), ``"minres"`` (indefinite) or
            ``"neumann"`` — see :func:`curvlab.solve`.
        max_matvecs: Hessian-vector products per solve (default ``10 n``).
        tol: relative residual of the solve (default 1e-10).
        hessian_lipschitz: L of the AICN step size (``"damped"``, optional) or the ``H`` of
            ``λ = sqrt(H‖g‖)`` (``"regularized"``, required).
        krylov_dim: Lanczos steps of ``"saddle-free"`` (default 20).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` for NaN/inf gradients.

    State: ``"step"`` (float32 scalar) per parameter; on the first parameter also
    ``"num_matvecs"``, ``"step_size"`` and ``"decrement"`` of the last step.

    Raises:
        ParameterError: an invalid hyper-parameter; ``"regularized"`` without
            ``hessian_lipschitz``.
        ClosureRequiredError: no closure, or one that calls ``backward()``.
        IndefiniteSystemError: with ``solver="cg"``, ``H + δI`` is not positive definite (use
            ``"minres"``, more damping, or ``"saddle-free"``).

    Example:
        >>> torch.manual_seed(0) and None
        >>> w = torch.zeros(3, requires_grad=True)
        >>> A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
        >>> opt = Newton([w])
        >>> _ = opt.step(lambda: 0.5 * w @ A @ w - w.sum())
        >>> torch.allclose(A @ w, torch.ones(3), atol=1e-5)   # one step solves a quadratic
        True
    """

    closure_mode: ClassVar[str] = "loss"

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 0.0,
        method: str = "damped",
        solver: str = "cg",
        max_matvecs: int | None = None,
        *,
        tol: float = 1e-10,
        hessian_lipschitz: float | None = None,
        krylov_dim: int = 20,
        on_nonfinite: str = "raise",
    ) -> None:
        validate_lr(lr)
        validate_nonnegative("damping", damping, "; damping < 0 makes the system indefinite")
        if method not in _METHODS:
            raise ParameterError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
        if solver not in _SOLVERS:
            raise ParameterError(f"solver must be one of {', '.join(_SOLVERS)}, got {solver!r}")
        if hessian_lipschitz is not None:
            validate_positive("hessian_lipschitz", hessian_lipschitz)
        elif method == "regularized":
            raise ParameterError(
                "method='regularized' needs hessian_lipschitz (the H of λ = sqrt(H‖g‖), an upper "
                "bound of the Hessian's Lipschitz constant), e.g. hessian_lipschitz=1.0"
            )
        for name, value in (("max_matvecs", max_matvecs), ("krylov_dim", krylov_dim)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ParameterError(f"{name} must be an integer >= 1, got {value!r}")
        validate_positive("tol", tol)
        validate_on_nonfinite(on_nonfinite)
        defaults = {
            "lr": lr,
            "damping": float(damping),
            "method": method,
            "solver": solver,
            "max_matvecs": max_matvecs,
            "tol": float(tol),
            "hessian_lipschitz": hessian_lipschitz,
            "krylov_dim": krylov_dim,
            "on_nonfinite": on_nonfinite,
            "nonfinite_skips": 0,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """Take one Newton step; ``closure`` returns the loss WITHOUT calling ``backward()``.

        Returns:
            The closure's loss (detached), at the parameters before the step.
        """
        groups = self.param_groups
        params = [p for g in groups for p in g["params"] if p.requires_grad]
        loss, _ = _call_closure(closure, params, type(self).__name__)
        with full_precision():  # the solve's products and algebra in the parameters' dtype
            return self._step_from(loss, params)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, after checking its layout.

        Newton's state holds no parameter-shaped tensor (step counts and the last step's
        diagnostics), so only the param groups, their hyper-parameters and the state keys are
        checked.

        Raises:
            StateDictError: the number of groups or parameters differs, a group lacks Newton's
                hyper-parameters, or the state has keys Newton does not use (another optimizer).
        """
        load_state_dict_checked(self, state_dict, state_keys=_STATE_KEYS)

    def _step_from(self, loss: Tensor, params: list[Tensor]) -> Tensor:
        """The rest of :meth:`step`, from the closure's loss (outside any autocast)."""
        groups = self.param_groups
        grads = _loss_grads(loss, params, create_graph=True, retain_graph=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.detach()
        if not used or not check_finite_grads(groups, step=lambda: next_step_number(self)):
            return loss.detach()
        lr_of = {id(p): float(g["lr"]) for g in groups for p in g["params"]}
        ps = [p for p, _ in used]
        first = groups[0]
        flat_grad = torch.cat([g.detach().reshape(-1) for _, g in used])
        nd = newton_direction(
            _GraphHessian(ps, [g for _, g in used]),
            flat_grad,
            method=first["method"],
            damping=first["damping"],
            solver=first["solver"],
            tol=first["tol"],
            max_matvecs=first["max_matvecs"],
            hessian_lipschitz=first["hessian_lipschitz"],
            krylov_dim=first["krylov_dim"],
        )
        newton_single_tensor(ps, nd.direction, [lr_of[id(p)] for p in ps], nd.step_size)
        for p in ps:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["step"] += 1
        info = self.state[ps[0]]
        info["num_matvecs"] = nd.num_matvecs
        info["step_size"] = nd.step_size
        info["decrement"] = nd.decrement
        return loss.detach()
