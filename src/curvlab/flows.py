"""Central flows: the smooth ODEs that GD and RMSProp at the edge of stability follow on average.

GD (Cohen, Damian, Talwalkar, Kolter & Lee, one eigenvalue at the edge), with S(w) = λ_max(H(w))
and u its unit eigenvector:

    dw/dt = −η [ ∇L(w) + ½ σ²(w) ∇S(w) ],        ∇S(w) = ∇_w (uᵀ H(w) u) at fixed u
    σ² = 0                                     while S(w) < 2/η
    σ² = max(0, −2 ⟨∇L, ∇S⟩ / ‖∇S‖²)             once S(w) ≥ 2/η   (so that dS/dt = 0)

that is, gradient flow projected onto {S ≤ 2/η}. σ² is the variance of GD's oscillation along u,
so the predicted time-averaged loss of GD is L(w) + ½·S·σ² = L(w) + σ²/η at S = 2/η.

RMSProp (ν ← β₂ν + (1 − β₂)g², w ← w − η g/(√ν + ε), as ``torch.optim.RMSprop`` with
alpha = β₂) has the preconditioner P = diag(√ν + ε) and the preconditioned sharpness
S(w, ν) = λ_max(P⁻¹H), with u the generalised eigenvector (Hu = S·Pu, uᵀPu = 1). Its central
flow moves (w, ν) together; the oscillation δ ~ σ² uuᵀ adds σ²(Hu)² to the expected squared
gradient that ν averages:

    dw/dt = −η P⁻¹ [ ∇L + ½ σ² ∇_w(uᵀHu) ]
    dν/dt = κ [ ∇L² + σ² (Hu)² − ν ],           κ = (1 − β₂)/β₂

(κ is the authors' continuous-time rate: ν_t − ν_{t−1} = κ(g_t² − ν_t) exactly). σ² makes the
stability margin A = uᵀ(2/η·P − H)u = 2/η − S complementary to it over one Euler step:
σ² ≥ 0, A + dt·dA/dt ≥ 0 and σ²·(A + dt·dA/dt) = 0, with dA/dt (u held fixed) affine in σ²,
as the authors' code solves it for one eigenvalue. With σ² = 0 throughout it is the "stable
flow", the naive continuous-time limit that ignores the oscillation.

This module integrates the flows for small parameter vectors (dense Hessians; ∇S by double
backward through a Hessian-vector product) with explicit Euler steps of size ``dt`` (in units of
optimizer steps); it is meant for analysis and tests, not for large models.

Paper: Cohen, Damian, Talwalkar, Kolter & Lee, "Understanding Optimization in Deep Learning with
Central Flows", 2024 (arXiv 2410.24206); code: github.com/centralflows/centralflows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.errors import InvalidArgumentError

__all__ = ["CentralFlow", "central_flow", "rmsprop_central_flow", "sharpness_and_gradient"]


@dataclass(frozen=True)
class CentralFlow:
    """A central-flow trajectory, recorded every ``record_every`` Euler steps.

    Attributes:
        times: flow time in optimizer steps, [T].
        weights: the flow's parameters, [T, n].
        loss: L(w(t)), [T].
        sharpness: S(w(t)) = λ_max(H) for GD, λ_max(P⁻¹H) for RMSProp, [T].
        sigma2: the oscillation variance σ²(t) (0 off the edge), [T].
        predicted_loss: L + ½·S·σ², the predicted time-averaged loss, [T].
        nu: RMSProp's squared-gradient average ν(t), [T, n] (``None`` for GD).
    """

    times: Tensor
    weights: Tensor
    loss: Tensor
    sharpness: Tensor
    sigma2: Tensor
    predicted_loss: Tensor
    nu: Tensor | None = None


def _top_eigenpair(hess: Tensor, precond: Tensor | None) -> tuple[Tensor, Tensor]:
    """λ_max(P⁻¹H) and its eigenvector u with uᵀPu = 1 (P = diag(precond); I when ``None``)."""
    sym = 0.5 * (hess + hess.T)
    if precond is None:
        values, vectors = torch.linalg.eigh(sym)
        return values[-1], vectors[:, -1]
    d = precond.rsqrt()  # P^{-1/2} H P^{-1/2} is symmetric with the eigenvalues of P⁻¹H
    values, vectors = torch.linalg.eigh(d[:, None] * sym * d[None, :])
    return values[-1], d * vectors[:, -1]


def _curvature_gradient(curvature: Tensor, wg: Tensor) -> Tensor:
    """∇_w of uᵀH(w)u (u fixed); zero when H does not depend on w (a quadratic)."""
    grad_s = (
        torch.autograd.grad(curvature, wg, allow_unused=True)[0]
        if curvature.requires_grad
        else None
    )
    return torch.zeros_like(wg) if grad_s is None else grad_s.detach()


def _sharpness_state(
    loss_fn: Callable[[Tensor], Tensor], w: Tensor, precond: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """L, ∇L, S, ∇S and u from the dense Hessian (``torch.func.hessian``) and a double backward
    (whose first backward is the gradient)."""
    w = w.detach()
    value, u = _top_eigenpair(torch.func.hessian(loss_fn)(w), precond)
    wg = w.clone().requires_grad_(True)
    loss = loss_fn(wg)
    (grad,) = torch.autograd.grad(loss, wg, create_graph=True)
    (hu,) = torch.autograd.grad(grad @ u, wg, create_graph=True)
    return loss.detach(), grad.detach(), value.detach(), _curvature_gradient(hu @ u, wg), u


def sharpness_and_gradient(
    loss_fn: Callable[[Tensor], Tensor], w: Tensor, precond: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """S(w) = λ_max(P⁻¹∇²L(w)) and ∇S(w) = ∇_w(uᵀH(w)u) at the eigenvector u held fixed.

    The Hessian is dense (``torch.func.hessian``); ∇S is the third-derivative contraction, by
    double backward through the Hessian-vector product H(w)u. Without ``precond`` P = I (GD's
    sharpness); with it P = diag(precond) and u is normalised to uᵀPu = 1, so uᵀHu = S.

    Args:
        loss_fn: L as a function of a flat parameter vector [n].
        w: the point [n].
        precond: the diagonal of P [n], positive (e.g. √ν + ε for RMSProp); ``None`` for P = I.

    Returns:
        S and ∇S [n], detached.

    Example:
        >>> import torch
        >>> s, g = sharpness_and_gradient(lambda w: 0.5 * w[1] * w[0] ** 2,
        ...                               torch.tensor([0.0, 3.0], dtype=torch.float64))
        >>> float(s), g.tolist()
        (3.0, [0.0, 1.0])
    """
    _, _, s, grad_s, _ = _sharpness_state(loss_fn, w, precond)
    return s, grad_s


#: below this many parameters the Hessian is built row by row on one graph (faster than vmap)
_ROWWISE_MAX = 16


def _flow_state(
    loss_fn: Callable[[Tensor], Tensor], w: Tensor, precond: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """L(w), ∇L(w), S, ∇S and u (uᵀPu = 1); for small ``w`` all from one autograd graph."""
    if w.numel() > _ROWWISE_MAX:
        return _sharpness_state(loss_fn, w, precond)
    wg = w.detach().clone().requires_grad_(True)
    loss = loss_fn(wg)
    (grad,) = torch.autograd.grad(loss, wg, create_graph=True)
    rows = [
        torch.autograd.grad(g, wg, retain_graph=True, create_graph=True, allow_unused=True)[0]
        for g in grad
    ]
    hess = torch.stack([torch.zeros_like(w) if r is None else r for r in rows])
    value, u = _top_eigenpair(hess.detach(), precond)
    return loss.detach(), grad.detach(), value, _curvature_gradient(u @ hess @ u, wg), u


def _check_flow_args(name: str, w0: Tensor, eta: float, t_max: float, dt: float, every: int) -> int:
    """Validate the shared arguments; return the number of Euler steps."""
    if not (eta > 0 and t_max > 0 and dt > 0 and every > 0):
        raise InvalidArgumentError(
            f"{name} needs eta, t_max, dt and record_every > 0, got eta={eta!r}, "
            f"t_max={t_max!r}, dt={dt!r}, record_every={every!r}"
        )
    if w0.ndim != 1:
        raise InvalidArgumentError(
            f"{name} needs a flat parameter vector w0 [n], got shape {tuple(w0.shape)}; "
            "flatten the parameters (torch.nn.utils.parameters_to_vector)"
        )
    return round(t_max / dt)


class _Recorder:
    """Collects (t, w, ν, L, S, σ²) every ``every`` Euler steps and builds a CentralFlow."""

    def __init__(self, dt: float, every: int) -> None:
        self.dt, self.every = dt, every
        self.rows: list[tuple[Tensor, ...]] = []

    def __call__(self, i: int, w: Tensor, nu: Tensor, loss: Tensor, s: Tensor, sig: Tensor) -> None:
        if i % self.every == 0:
            self.rows.append((torch.tensor(i * self.dt), w, nu, loss.detach(), s, sig))

    def flow(self, with_nu: bool) -> CentralFlow:
        t, w, nu, loss, s, sig = (torch.stack(col) for col in zip(*self.rows))
        return CentralFlow(t, w, loss, s, sig, loss + 0.5 * s * sig, nu if with_nu else None)


def central_flow(
    loss_fn: Callable[[Tensor], Tensor],
    w0: Tensor,
    eta: float,
    t_max: float,
    dt: float = 0.25,
    record_every: int = 4,
) -> CentralFlow:
    """Integrate GD's central flow dw/dt = −η[∇L + ½σ²∇S] from ``w0`` for ``t_max`` GD steps.

    Args:
        loss_fn: L as a function of a flat parameter vector [n] (returns a scalar).
        w0: the start [n] (float64 recommended).
        eta: GD's learning rate (the edge is S = 2/η).
        t_max: how long, in GD steps (flow time t ↔ step t).
        dt: Euler step in GD steps (default 0.25).
        record_every: record every this many Euler steps.

    Returns:
        A :class:`CentralFlow`.

    Raises:
        InvalidArgumentError: ``eta``, ``t_max``, ``dt`` or ``record_every`` not positive, or
            ``w0`` not a 1-D tensor.

    Example:
        >>> import torch
        >>> a = torch.tensor([1.0, 3.0], dtype=torch.float64)   # a quadratic: σ² stays 0
        >>> flow = central_flow(lambda w: 0.5 * (a * w * w).sum(),
        ...                     torch.ones(2, dtype=torch.float64), eta=0.1, t_max=10)
        >>> float(flow.sigma2.abs().max())
        0.0
    """
    steps = _check_flow_args("central_flow", w0, eta, t_max, dt, record_every)
    edge = 2.0 / eta
    w = w0.detach().clone()
    record = _Recorder(dt, record_every)
    for i in range(steps + 1):
        loss, grad, s, grad_s, _ = _flow_state(loss_fn, w)
        sigma2 = torch.zeros((), dtype=w.dtype)
        if s >= edge * (1 - 1e-6) and grad_s.norm() > 0:
            sigma2 = torch.clamp(-2 * (grad @ grad_s) / (grad_s @ grad_s), min=0.0)
        record(i, w, w, loss, s, sigma2)
        w = w - dt * eta * (grad + 0.5 * sigma2 * grad_s)
    return record.flow(with_nu=False)


def rmsprop_central_flow(
    loss_fn: Callable[[Tensor], Tensor],
    w0: Tensor,
    eta: float,
    beta2: float,
    t_max: float,
    nu0: Tensor | None = None,
    eps: float = 0.0,
    dt: float = 0.25,
    record_every: int = 4,
    stable: bool = False,
) -> CentralFlow:
    """Integrate RMSProp's central flow for (w, ν) from ``(w0, nu0)`` for ``t_max`` steps.

    The ODE and σ²'s complementarity rule are in the module docstring; S = λ_max(P⁻¹H) with
    P = diag(√ν + ε) is held at 2/η once it gets there. ``stable=True`` sets σ² = 0 throughout
    (the naive "stable flow" baseline).

    Args:
        loss_fn: L as a function of a flat parameter vector [n] (returns a scalar).
        w0: the start [n] (float64 recommended).
        eta: RMSProp's learning rate (the edge is S = 2/η).
        beta2: the squared-gradient average's decay (``torch.optim.RMSprop``'s ``alpha``), in
            (0, 1).
        t_max: how long, in RMSProp steps.
        nu0: ν at t = 0 [n], positive; default ∇L(w0)² (RMSProp's ν after its first step).
        eps: ε added to √ν.
        dt: Euler step in RMSProp steps (default 0.25); ``dt·(1 − β₂)/β₂`` must be < 1.
        record_every: record every this many Euler steps.
        stable: integrate the stable flow (σ² = 0) instead.

    Returns:
        A :class:`CentralFlow` with ``nu`` set; ``sharpness`` is the preconditioned sharpness.

    Raises:
        InvalidArgumentError: ``eta``, ``t_max``, ``dt`` or ``record_every`` not positive,
            ``w0`` not a 1-D tensor, ``beta2`` outside (0, 1), ``eps`` negative, ``nu0`` not
            positive or not shaped like ``w0``, or ``dt·(1 − β₂)/β₂ ≥ 1``.

    Example:
        >>> import torch
        >>> flow = rmsprop_central_flow(lambda w: 0.5 * (w * w).sum(),
        ...                             torch.ones(2, dtype=torch.float64), 0.1, 0.9, 4.0)
        >>> flow.nu.shape, float(flow.sigma2.abs().max())
        (torch.Size([5, 2]), 0.0)
    """
    steps = _check_flow_args("rmsprop_central_flow", w0, eta, t_max, dt, record_every)
    if not (0 < beta2 < 1 and eps >= 0):
        raise InvalidArgumentError(
            f"rmsprop_central_flow needs 0 < beta2 < 1 and eps >= 0, got beta2={beta2!r}, "
            f"eps={eps!r} (beta2 is torch.optim.RMSprop's alpha, e.g. 0.99)"
        )
    kappa = (1 - beta2) / beta2
    if kappa * dt >= 1:
        raise InvalidArgumentError(
            f"rmsprop_central_flow needs dt·(1 − beta2)/beta2 < 1 so that ν stays positive, got "
            f"{kappa * dt:g}; lower dt below {1 / kappa:g} or raise beta2"
        )
    w = w0.detach().clone()
    wg = w.clone().requires_grad_(True)
    nu = torch.autograd.grad(loss_fn(wg), wg)[0] ** 2 if nu0 is None else nu0.detach().clone()
    if nu.shape != w.shape or not bool((nu > 0).all()):
        raise InvalidArgumentError(
            f"rmsprop_central_flow needs nu0 > 0 shaped like w0 {tuple(w.shape)}, got shape "
            f"{tuple(nu.shape)} with minimum {float(nu.min()):g}; pass a positive nu0 (the "
            "default ∇L(w0)² is 0 where a gradient entry is)"
        )
    edge = 2.0 / eta
    record = _Recorder(dt, record_every)
    for i in range(steps + 1):
        root = nu.sqrt()
        precond = root + eps
        loss, grad, s, grad_s, u = _flow_state(loss_fn, w, precond)
        dw0, dw1 = -eta * grad / precond, -0.5 * eta * grad_s / precond
        dnu0, dnu1 = kappa * (grad**2 - nu), kappa * (s * precond * u) ** 2
        sigma2 = torch.zeros((), dtype=w.dtype)
        if not stable:
            # dA/dt = (2/η)·Σ u²·(dν/dt)/(2√ν) − ⟨∇S, dw/dt⟩ = da0 + σ²·da1 (u held fixed)
            da0 = edge * (u * u * dnu0 / (2 * root)).sum() - grad_s @ dw0
            da1 = edge * (u * u * dnu1 / (2 * root)).sum() - grad_s @ dw1
            if da1 > 0:
                sigma2 = torch.clamp(-((edge - s) + dt * da0) / (dt * da1), min=0.0)
        record(i, w, nu, loss, s, sigma2)
        w = w + dt * (dw0 + sigma2 * dw1)
        nu = nu + dt * (dnu0 + sigma2 * dnu1)
    return record.flow(with_nu=True)
