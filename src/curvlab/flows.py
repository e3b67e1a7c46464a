"""Central flows: the smooth ODE that gradient descent at the edge of stability follows on average.

Rule (Cohen, Damian, Talwalkar, Kolter & Lee, one eigenvalue at the edge), with S(w) = λ_max(H(w))
and u its unit eigenvector:

    dw/dt = −η [ ∇L(w) + ½ σ²(w) ∇S(w) ],        ∇S(w) = ∇_w (uᵀ H(w) u) at fixed u
    σ² = 0                                     while S(w) < 2/η
    σ² = max(0, −2 ⟨∇L, ∇S⟩ / ‖∇S‖²)             once S(w) ≥ 2/η   (so that dS/dt = 0)

that is, gradient flow projected onto {S ≤ 2/η}. σ² is the variance of GD's oscillation along u,
so the predicted time-averaged loss of GD is L(w) + ½·S·σ² = L(w) + σ²/η at S = 2/η.

This module integrates the flow for small parameter vectors (dense Hessians by ``torch.func``;
∇S by double backward through a Hessian-vector product) with explicit Euler steps of size ``dt``
(in units of GD steps); it is meant for analysis and tests, not for large models.

Paper: Cohen, Damian, Talwalkar, Kolter & Lee, "Understanding Optimization in Deep Learning with
Central Flows", 2024 (arXiv 2410.24206).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.errors import InvalidArgumentError

__all__ = ["CentralFlow", "central_flow", "sharpness_and_gradient"]


@dataclass(frozen=True)
class CentralFlow:
    """A central-flow trajectory, recorded every ``record_every`` Euler steps.

    Attributes:
        times: flow time in GD steps, [T].
        weights: the flow's parameters, [T, n].
        loss: L(w(t)), [T].
        sharpness: S(w(t)) = λ_max(H), [T].
        sigma2: the oscillation variance σ²(t) (0 off the edge), [T].
        predicted_loss: L + ½·S·σ², GD's predicted time-averaged loss, [T].
    """

    times: Tensor
    weights: Tensor
    loss: Tensor
    sharpness: Tensor
    sigma2: Tensor
    predicted_loss: Tensor


def sharpness_and_gradient(loss_fn: Callable[[Tensor], Tensor], w: Tensor) -> tuple[Tensor, Tensor]:
    """S(w) = λ_max(∇²L(w)) and ∇S(w) = ∇_w(uᵀH(w)u) at the top eigenvector u held fixed.

    The Hessian is dense (``torch.func.hessian``); ∇S is the third-derivative contraction, by
    double backward through the Hessian-vector product H(w)u.

    Example:
        >>> import torch
        >>> s, g = sharpness_and_gradient(lambda w: 0.5 * w[1] * w[0] ** 2,
        ...                               torch.tensor([0.0, 3.0], dtype=torch.float64))
        >>> float(s), g.tolist()
        (3.0, [0.0, 1.0])
    """
    w = w.detach()
    hess = torch.func.hessian(loss_fn)(w)
    values, vectors = torch.linalg.eigh(0.5 * (hess + hess.T))
    u = vectors[:, -1].detach()
    wg = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(wg), wg, create_graph=True)
    (hu,) = torch.autograd.grad(grad @ u, wg, create_graph=True)
    curvature = hu @ u
    if not curvature.requires_grad:  # the Hessian does not depend on w (a quadratic)
        return values[-1].detach(), torch.zeros_like(w)
    (grad_s,) = torch.autograd.grad(curvature, wg, allow_unused=True)
    return values[-1].detach(), torch.zeros_like(w) if grad_s is None else grad_s.detach()


#: below this many parameters the Hessian is built row by row on one graph (faster than vmap)
_ROWWISE_MAX = 16


def _flow_state(
    loss_fn: Callable[[Tensor], Tensor], w: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L(w), ∇L(w), S(w) and ∇S(w); for small ``w`` all from one autograd graph."""
    wg = w.detach().clone().requires_grad_(True)
    loss = loss_fn(wg)
    if w.numel() > _ROWWISE_MAX:
        (grad,) = torch.autograd.grad(loss, wg)
        return (loss.detach(), grad, *sharpness_and_gradient(loss_fn, w))
    (grad,) = torch.autograd.grad(loss, wg, create_graph=True)
    rows = [
        torch.autograd.grad(g, wg, retain_graph=True, create_graph=True, allow_unused=True)[0]
        for g in grad
    ]
    hess = torch.stack([torch.zeros_like(w) if r is None else r for r in rows])
    values, vectors = torch.linalg.eigh(0.5 * (hess + hess.T).detach())
    u = vectors[:, -1]
    curvature = u @ hess @ u
    grad_s = (
        torch.autograd.grad(curvature, wg, allow_unused=True)[0]
        if curvature.requires_grad
        else None
    )
    return (
        loss.detach(),
        grad.detach(),
        values[-1],
        torch.zeros_like(w) if grad_s is None else grad_s,
    )


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
    if not (eta > 0 and t_max > 0 and dt > 0 and record_every > 0):
        raise InvalidArgumentError(
            f"central_flow needs eta, t_max, dt and record_every > 0, got eta={eta!r}, "
            f"t_max={t_max!r}, dt={dt!r}, record_every={record_every!r}"
        )
    if w0.ndim != 1:
        raise InvalidArgumentError(
            f"central_flow needs a flat parameter vector w0 [n], got shape {tuple(w0.shape)}; "
            "flatten the parameters (torch.nn.utils.parameters_to_vector)"
        )
    edge = 2.0 / eta
    w = w0.detach().clone()
    rec: dict[str, list[Tensor]] = {k: [] for k in ("t", "w", "loss", "s", "sigma2")}
    steps = round(t_max / dt)
    for i in range(steps + 1):
        loss, grad, s, grad_s = _flow_state(loss_fn, w)
        sigma2 = torch.zeros((), dtype=w.dtype)
        if s >= edge * (1 - 1e-6) and grad_s.norm() > 0:
            sigma2 = torch.clamp(-2 * (grad @ grad_s) / (grad_s @ grad_s), min=0.0)
        if i % record_every == 0:
            for key, val in (("t", torch.tensor(i * dt)), ("w", w), ("loss", loss.detach())):
                rec[key].append(val)
            rec["s"].append(s)
            rec["sigma2"].append(sigma2)
        w = w - dt * eta * (grad + 0.5 * sigma2 * grad_s)
    loss_t, s_t, sig_t = (torch.stack(rec[k]) for k in ("loss", "s", "sigma2"))
    return CentralFlow(
        times=torch.stack(rec["t"]),
        weights=torch.stack(rec["w"]),
        loss=loss_t,
        sharpness=s_t,
        sigma2=sig_t,
        predicted_loss=loss_t + 0.5 * s_t * sig_t,
    )
