"""GFS sharpness: λ_max at the end of gradient flow started from the current iterate.

Kreisler, Nacson, Soudry & Carmon (2023) call S_GFS(w) = λ_max(∇²L(φ(w))) the *gradient-flow
solution sharpness*, where φ(w) is the limit of gradient flow dw/dt = −∇L started at w. They prove
that GD decreases it monotonically on scalar networks f(x) = (∏ wᵢ)·x with the square loss (and
beyond), also at the edge of stability where the loss itself oscillates, and that GD converges once
S_GFS < 2/η.

The monitor integrates gradient flow on a *copy* of the model with classical Runge–Kutta (RK4) steps
h = ``flow_step``/λ_max(w) (λ_max by Lanczos at the iterate; the step is halved whenever the loss
rises) until ‖∇L‖ ≤ ``grad_tol`` or ``max_flow_steps``, then runs Lanczos (:func:`curvlab.eigsh`)
on the :class:`~curvlab.operators.HessianOperator` of the copy at the limit. The model itself is
untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from curvlab.errors import InvalidArgumentError
from curvlab.estimators import eigsh
from curvlab.monitors._attach import LossFn
from curvlab.monitors._curvature import HessianMonitor
from curvlab.operators import HessianOperator

__all__ = ["GFSSharpness"]


def _norm(tensors: list[Tensor]) -> float:
    return float(torch.stack([(t * t).sum() for t in tensors]).sum().sqrt())


def _assign(params: list[Tensor], start: list[Tensor], direction: list[Tensor], h: float) -> None:
    """Set each parameter to ``start − h·direction`` (in place)."""
    with torch.no_grad():
        for p, p0, d in zip(params, start, direction):
            p.copy_(p0 - h * d)


class GFSSharpness(HessianMonitor):
    """Monitor the sharpness of the gradient-flow solution reached from the current iterate.

    Args:
        model, loss_fn: the model and ``loss_fn(outputs, targets)``.
        data: the batch ``(inputs, targets)`` the flow minimises (full batch for GD).
        params: the parameters (default: all trainable).
        flow_step: RK4 step as a fraction of 1/λ_max at the iterate (default 0.2).
        grad_tol: stop the flow once ‖∇L‖ ≤ ``grad_tol`` (default 1e-7).
        max_flow_steps: at most this many flow steps per check (default 20,000).
        tol: Lanczos relative residual tolerance (default 1e-6).
        every: check every ``every`` steps. name: prefix (default ``"gfs"``).

    Numbers: ``value`` (λ_max at the flow's limit), ``iterate_sharpness`` (λ_max at the iterate),
    ``flow_steps``, ``grad_norm`` (at the limit), ``limit_loss`` and ``converged`` (1.0 when the
    gradient tolerance was met).

    Raises:
        InvalidArgumentError: ``flow_step`` not in (0, 1], ``grad_tol`` or ``tol`` not positive,
            ``max_flow_steps`` < 1.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlab.monitors import GFSSharpness, attach
        >>> model = nn.Linear(1, 1, bias=False).double()     # L = ½(w − 1)²: H = 1 everywhere
        >>> x = torch.ones(1, 1, dtype=torch.float64)
        >>> loss = lambda out, y: 0.5 * ((out - y) ** 2).sum()
        >>> handle = attach(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                 GFSSharpness(model, loss, (x, x), every=1))
        >>> round(handle.check_now()["gfs/value"], 9)
        1.0

    Paper: Kreisler, Nacson, Soudry & Carmon, "Gradient Descent Monotonically Decreases the
    Sharpness of Gradient Flow Solutions in Scalar Networks and Beyond", ICML 2023
    (arXiv 2305.13064).
    """

    default_name = "gfs"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | Callable[..., Tensor],
        data: tuple[Tensor, Tensor],
        *,
        flow_step: float = 0.2,
        grad_tol: float = 1e-7,
        max_flow_steps: int = 20_000,
        tol: float = 1e-6,
        params: Sequence[Tensor] | None = None,
        every: int = 10,
        name: str | None = None,
    ) -> None:
        super().__init__(model, loss_fn, data, params=params, every=every, name=name)
        if not 0 < flow_step <= 1:
            raise InvalidArgumentError(
                f"flow_step must be in (0, 1] (a fraction of 1/λ_max; e.g. 0.2), got {flow_step!r}"
            )
        if not (grad_tol > 0 and tol > 0):
            raise InvalidArgumentError(
                f"grad_tol and tol must be > 0 (e.g. 1e-7 and 1e-6), got {grad_tol!r}, {tol!r}"
            )
        if not (isinstance(max_flow_steps, int) and max_flow_steps >= 1):
            raise InvalidArgumentError(
                f"max_flow_steps must be an integer >= 1 (e.g. 20000), got {max_flow_steps!r}"
            )
        self.flow_step, self.grad_tol, self.max_flow_steps = flow_step, grad_tol, max_flow_steps
        self.tol = tol

    def _lambda_max(self, model: nn.Module, params: list[Tensor]) -> float:
        assert self.data is not None
        op = HessianOperator(model, self.loss_fn, tuple(self.data), params=params)
        gen = torch.Generator().manual_seed(0)
        return float(eigsh(op, k=1, which="LA", tol=self.tol, generator=gen).values[0])

    def _loss_and_grads(self, model: nn.Module, params: list[Tensor]) -> tuple[float, list[Tensor]]:
        assert self.data is not None and self.loss_fn is not None
        inputs, targets = self.data
        loss = self.loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), list(grads)

    def _rk4_direction(
        self,
        model: nn.Module,
        params: list[Tensor],
        start: list[Tensor],
        k1: list[Tensor],
        h: float,
    ) -> list[Tensor]:
        """The RK4 average slope (k1 + 2k2 + 2k3 + k4)/6 of dw/dt = −∇L from ``start``."""
        slopes = [k1]
        for frac in (0.5, 0.5, 1.0):
            _assign(params, start, slopes[-1], frac * h)
            slopes.append(self._loss_and_grads(model, params)[1])
        return [(a + 2 * b + 2 * c + d) / 6 for a, b, c, d in zip(*slopes)]

    def compute(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Flow a copy of the model to a stationary point; λ_max there and at the iterate."""
        del optimizer  # the flow does not depend on the optimizer
        assert self.model is not None
        positions = {id(p): i for i, p in enumerate(self.model.parameters())}
        clone = copy.deepcopy(self.model)
        clone_all: list[Tensor] = list(clone.parameters())
        params: list[Tensor] = [clone_all[positions[id(p)]] for p in self.params]
        start = self._lambda_max(clone, params)
        h = self.flow_step / max(start, torch.finfo(params[0].dtype).tiny)
        loss, grads = self._loss_and_grads(clone, params)
        steps, norm = 0, _norm(grads)
        while norm > self.grad_tol and steps < self.max_flow_steps:
            start_point = [p.detach().clone() for p in params]
            direction = self._rk4_direction(clone, params, start_point, grads, h)
            _assign(params, start_point, direction, h)
            new_loss, new_grads = self._loss_and_grads(clone, params)
            steps += 1
            if new_loss > loss:  # too large a step for the curvature met on the way: undo, halve
                _assign(params, start_point, direction, 0.0)
                h /= 2
                continue
            loss, grads, norm = new_loss, new_grads, _norm(new_grads)
        return {
            "value": self._lambda_max(clone, params),
            "iterate_sharpness": start,
            "flow_steps": float(steps),
            "grad_norm": norm,
            "limit_loss": loss,
            "converged": float(norm <= self.grad_tol),
        }
