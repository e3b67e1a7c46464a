"""Ill-conditioned and noisy quadratics with a known optimum.

*Ill-conditioned quadratic*: ``f(x) = ½ (x − x*)ᵀ Q (x − x*)`` with ``Q = Rᵀ diag(λ) R``, ``R`` a
seeded random rotation (QR of a Gaussian matrix, sign-fixed) and ``λ`` log-spaced in ``[1/κ, 1]``,
so
``f* = 0`` and ``x*`` are known exactly; the metric is the relative suboptimality
``(f(x) − f*) / (f(x₀) − f*)``. Gradient descent needs O(κ) steps, heavy ball O(√κ), an exact
preconditioner O(1) (Nesterov 2004, *Introductory Lectures on Convex Optimization*, §2.1). The
problem is deterministic and has no data: its "validation" and "test" metric is the objective
itself (``rel_subopt``), as its declared splits say.

*Noisy quadratic* (DeepOBS ``quadratic_deep``, Schneider, Balles & Hennig 2019,
https://openreview.net/forum?id=rJg6ssC5Y7): 100 dimensions, 90 eigenvalues from U(0, 1) and 10
from U(30, 60), randomly rotated; each minibatch loss is ``½ (x − ξ)ᵀ Q (x − ξ)`` averaged over ``ξ
~ N(0, I)`` draws, whose expectation is ``½ xᵀQx + ½ tr Q``. The metric is the noise-free part ``½
xᵀ Q x`` (``subopt``). Splits: training draws fresh ``ξ`` every step; the validation and test
losses average the minibatch loss over two fixed held-out sets of ``held_out`` draws each (seeded by
the run's seed and the split), an unbiased estimate of the expected loss. Deviation from DeepOBS:
the rotation is drawn from the run's seed instead of a global ``np.random.RandomState(42)`` at
import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab.bench.problems.base import (
    Problem,
    ProblemInstance,
    Target,
    gaussian_held_out,
    gaussian_held_out_splits,
)

__all__ = ["IllConditionedQuadratic", "NoisyQuadratic", "random_rotation"]


def random_rotation(dim: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian matrix, signs of diag(R) fixed."""
    g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype)


class _QuadraticModel(nn.Module):
    q: Tensor
    x_star: Tensor

    def __init__(self, x0: Tensor, q: Tensor, x_star: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x0.clone())
        self.register_buffer("q", q)
        self.register_buffer("x_star", x_star)

    def forward(self, shift: Tensor) -> Tensor:
        # shift: [b, d] noise draws (zeros for the deterministic problem); returns the mean loss.
        d = self.x.unsqueeze(0) - self.x_star.unsqueeze(0) - shift
        return 0.5 * ((d @ self.q) * d).sum(dim=1).mean()


def _identity_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs


@dataclass
class IllConditionedQuadratic(Problem):
    """Deterministic quadratic of condition number ``kappa`` in ``dim`` dimensions (float64).

    Example:
        >>> p = IllConditionedQuadratic(kappa=1e2, dim=10)
        >>> inst = p.build(seed=0)
        >>> round(inst.evaluate()["rel_subopt"], 12)
        1.0
    """

    kappa: float = 1e4
    dim: int = 100
    target: Target = field(default_factory=lambda: Target("rel_subopt"))
    budget_steps: int = 300
    splits: dict[str, str] = field(
        default_factory=lambda: {
            "train": "the objective (deterministic, no data)",
            "valid": "the objective itself: no data, so no held-out part",
            "test": "the objective itself (the same number as valid)",
        }
    )

    def default_name_and_description(self) -> tuple[str, str]:
        return (
            f"quadratic-k1e{round(math.log10(self.kappa))}",
            f"ill-conditioned quadratic, d={self.dim}, condition number {self.kappa:g}, "
            "known optimum",
        )

    def build(self, seed: int) -> ProblemInstance:
        gen = torch.Generator().manual_seed(seed)
        dt = torch.float64
        rot = random_rotation(self.dim, gen, dt)
        lam = torch.logspace(-math.log10(self.kappa), 0.0, self.dim, dtype=dt)
        q = rot.T @ (lam.unsqueeze(1) * rot)
        q = 0.5 * (q + q.T)
        x_star = torch.randn(self.dim, generator=gen, dtype=dt)
        x0 = x_star + torch.randn(self.dim, generator=gen, dtype=dt)
        model = _QuadraticModel(x0, q, x_star)
        zero = torch.zeros(1, self.dim, dtype=dt)
        d0 = x0 - x_star
        f0 = float(0.5 * d0 @ q @ d0)

        def evaluate() -> dict[str, float]:
            with torch.no_grad():
                f = float(model(zero))
            return {"loss": f, "rel_subopt": f / f0}

        return ProblemInstance(
            model=model,
            loss_fn=_identity_loss,
            next_batch=lambda: (zero, zero),
            evaluate=evaluate,
        )


@dataclass
class NoisyQuadratic(Problem):
    """DeepOBS-style noisy quadratic (100 dimensions, minibatch noise in the location).

    Example:
        >>> inst = NoisyQuadratic().build(seed=0)
        >>> sorted(inst.evaluate())
        ['subopt', 'test_loss', 'valid_loss']
    """

    dim: int = 100
    batch_size: int = 32
    name: str = "noisy-quadratic"
    description: str = (
        "DeepOBS quadratic_deep: 90 eigenvalues U(0,1) + 10 U(30,60), rotated, minibatch noise"
    )
    held_out: int = 1000
    target: Target = field(default_factory=lambda: Target("valid_loss"))
    budget_steps: int = 300
    splits: dict[str, str] = field(
        default_factory=lambda: gaussian_held_out_splits(
            "batch_size fresh noise draws per step", "fixed noise draws"
        )
    )

    def build(self, seed: int) -> ProblemInstance:
        gen = torch.Generator().manual_seed(seed)
        dt = torch.float32
        n_big = self.dim // 10
        lam = torch.cat(
            [
                torch.rand(self.dim - n_big, generator=gen, dtype=torch.float64),
                30.0 + 30.0 * torch.rand(n_big, generator=gen, dtype=torch.float64),
            ]
        )
        rot = random_rotation(self.dim, gen, torch.float64)
        q = (rot.T @ (lam.unsqueeze(1) * rot)).to(dt)
        q = 0.5 * (q + q.T)
        x0 = torch.ones(self.dim, dtype=dt)
        model = _QuadraticModel(x0, q, torch.zeros(self.dim, dtype=dt))
        dummy = torch.zeros(1)
        zero = torch.zeros(1, self.dim, dtype=dt)

        def next_batch() -> tuple[Tensor, Tensor]:
            return torch.randn(self.batch_size, self.dim, generator=gen, dtype=dt), dummy

        held_out = gaussian_held_out(seed, self.held_out, self.dim, dt)

        def evaluate() -> dict[str, float]:
            with torch.no_grad():
                out = {f"{s}_loss": float(model(xi)) for s, xi in held_out.items()}
                out["subopt"] = float(model(zero))
            return out

        return ProblemInstance(
            model=model, loss_fn=_identity_loss, next_batch=next_batch, evaluate=evaluate
        )
