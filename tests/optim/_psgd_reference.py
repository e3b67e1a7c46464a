"""Shared pieces of the PSGD reference loops (LRA, XMat): the test problem over two parameters and
the pair ``(v, Hv)`` the author's Newton-type classes form at a step, computed independently."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvlab.optim._psgd import pair_probe_seed

DT = torch.float64
SHAPES = ((3, 4), (5,))  # W and b: 17 entries


def problem() -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]:
    """A non-quadratic loss of ``(W, b)`` and its start ``(W0, b0)``, float64, seeded."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 4, dtype=DT, generator=g)
    c = torch.randn(5, dtype=DT, generator=g)
    W0, b0 = torch.randn(3, 4, dtype=DT, generator=g), torch.randn(5, dtype=DT, generator=g)

    def loss(W: Tensor, b: Tensor) -> Tensor:
        return ((W - A) ** 4).sum() + (W.sum() + b @ c) ** 2 + (b**2).sum()

    return loss, W0, b0


def flat_loss(loss: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The loss of the concatenated vector ``[vec(W); b]``."""
    return lambda z: loss(z[:12].reshape(3, 4), z[12:])


def newton_pair(
    f: Callable[[Tensor], Tensor], x: Tensor, t: int, fit: str, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g, v, h)`` at ``x``, step ``t``: ``v ~ N(0, I)`` per parameter (the optimizer's seeded
    generators), ``h = Hv`` by double backward or ``(g(x + δv) - g(x))/δ``, ``δ = √ε``."""
    z = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(f(z), z, create_graph=True)[0]
    vs = []
    for j, shape in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(pair_probe_seed(seed, t, j))
        vs.append(torch.randn(shape, dtype=DT, generator=gen).reshape(-1))
    v = torch.cat(vs)
    if fit == "hvp":
        hv = torch.autograd.grad(grad, z, v)[0]
    else:
        delta = torch.finfo(DT).eps ** 0.5
        z2 = (x + delta * v).requires_grad_(True)
        hv = (torch.autograd.grad(f(z2), z2)[0] - grad.detach()) / delta
    return grad.detach(), v, hv


def pair_scale(v: Tensor, hv: Tensor) -> float:
    """The official on-the-fly initial scale ``(mean v²)^¼ (mean h⁴ + 1e-36)^(-⅛)``."""
    return float(v.square().mean() ** 0.25 * (hv.pow(4).mean() + 1e-36) ** -0.125)


def damped(hv: Tensor, gen: torch.Generator) -> Tensor:
    """``h + (1e-9 + ε|h|) ⊙ n``, ``n ~ N(0, I)`` from ``gen`` (the official pair damping)."""
    n = torch.randn(hv.shape, dtype=DT, generator=gen)
    return hv + (1e-9 + torch.finfo(DT).eps * hv.abs()) * n


def whitening_step(
    opt: torch.optim.Optimizer,
    loss: Callable[[Tensor, Tensor], Tensor],
    ps: Sequence[Tensor],
    x: Tensor,
) -> tuple[Tensor, float]:
    """One backward-closure step of ``opt`` on ``loss(*ps)``; returns the reference gradient at
    the column ``x`` and the official whitening scale ``(mean g⁴ + 1e-36)^(-⅛)`` of it."""
    opt.zero_grad()
    loss(*ps).backward()
    opt.step()
    xv = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(loss(xv[:12].reshape(3, 4), xv[12:, 0]), xv)
    return gr, float((gr.pow(4).mean() + 1e-36) ** (-1 / 8))
