"""Over-parameterised low-rank matrix sensing, symmetric (X Xᵀ) and asymmetric (F Gᵀ).

Ground truth ``M* = U Uᵀ / ‖U Uᵀ‖₂`` with ``U ∈ ℝ^{n×r}`` Gaussian; ``m`` Gaussian (non-symmetric)
measurement matrices ``Aᵢ`` give ``yᵢ = ⟨Aᵢ, M*⟩``. The loss is ``(1/2m) Σ (⟨Aᵢ, M⟩ − yᵢ)²`` with
``M = X Xᵀ`` (symmetric, ``X ∈ ℝ^{n×k}``) or ``M = F Gᵀ`` (asymmetric), initialised at scale ``α``.
The recovery error ``error = ‖M − M*‖_F`` is recorded; the target metric is the same loss on
``held_out`` fresh measurements (``valid_loss``; the final quality ``test_loss`` on others), whose
expectation is ``½ ‖M − M*‖²_F``. With ``k > r`` randomly initialised GD on the symmetric form is
sublinear (Ω(1/T²)), the asymmetric one linear at a rate ∝ α² (Xiong, Ding & Du, ICLR 2024, arXiv
2310.01769); preconditioned methods can remove the slowdown (Xu, Shen, Ma & Chi 2023, "The Power of
Preconditioning in Overparameterized Low-Rank Matrix Sensing", arXiv 2302.01186). Non-symmetric
``Aᵢ`` matter for the asymmetric case: with symmetric ones the antisymmetric part of F Gᵀ is
unobservable (research notes §3.1 c). float64, full batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab.bench.problems.base import Problem, ProblemInstance, Target

__all__ = ["MatrixSensing"]


class _Factorisation(nn.Module):
    def __init__(self, n: int, k: int, alpha: float, symmetric: bool, gen: torch.Generator) -> None:
        super().__init__()
        dt = torch.float64
        self.symmetric = symmetric
        self.f = nn.Parameter(alpha * torch.randn(n, k, generator=gen, dtype=dt) / n**0.5)
        if not symmetric:
            self.g = nn.Parameter(alpha * torch.randn(n, k, generator=gen, dtype=dt) / n**0.5)

    def matrix(self) -> Tensor:
        return self.f @ (self.f if self.symmetric else self.g).T

    def forward(self, a: Tensor) -> Tensor:
        # a: [m, n, n] measurement matrices -> [m] measurements <A_i, M>
        return torch.einsum("mij,ij->m", a, self.matrix())


@dataclass
class MatrixSensing(Problem):
    """Matrix sensing with an ``n×k`` factorisation of a rank-``r`` target from ``m`` measurements.

    Example:
        >>> inst = MatrixSensing(symmetric=False).build(seed=0)
        >>> 1.0 < inst.evaluate()["error"] < 1.5   # ‖M*‖_F with M ≈ 0
        True
    """

    symmetric: bool = True
    n: int = 20
    r: int = 2
    k: int = 6
    m: int = 600
    alpha: float = 1e-2
    held_out: int = 200
    target: Target = field(default_factory=lambda: Target("valid_loss"))
    budget_steps: int = 500
    splits: dict[str, str] = field(
        default_factory=lambda: {
            "train": "m Gaussian measurements (fixed)",
            "valid": "held_out other Gaussian measurements (fixed)",
            "test": "held_out other Gaussian measurements (fixed)",
        }
    )

    def default_name_and_description(self) -> tuple[str, str]:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"sensing-{kind}",
            f"{kind} over-parameterised matrix sensing, n={self.n}, rank {self.r}, k={self.k}, "
            f"m={self.m}",
        )

    def build(self, seed: int) -> ProblemInstance:
        # The sensing operator and M* are fixed (seed 0) so every seed solves the same problem;
        # the run's seed draws the initialisation.
        data_gen = torch.Generator().manual_seed(12345)
        dt = torch.float64
        u = torch.randn(self.n, self.r, generator=data_gen, dtype=dt)
        m_star = u @ u.T
        m_star = m_star / torch.linalg.matrix_norm(m_star, ord=2)
        a = torch.randn(self.m, self.n, self.n, generator=data_gen, dtype=dt)
        y = torch.einsum("mij,ij->m", a, m_star)
        held_out = {}
        for split in ("valid", "test"):
            a_s = torch.randn(self.held_out, self.n, self.n, generator=data_gen, dtype=dt)
            held_out[split] = (a_s, torch.einsum("mij,ij->m", a_s, m_star))
        model = _Factorisation(
            self.n, self.k, self.alpha, self.symmetric, torch.Generator().manual_seed(seed)
        )

        def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
            return 0.5 * ((outputs - targets) ** 2).mean()

        def evaluate() -> dict[str, float]:
            with torch.no_grad():
                err = float(torch.linalg.matrix_norm(model.matrix() - m_star))
                metrics = {"error": err, "loss": float(loss_fn(model(a), y))}
                for split, (a_s, y_s) in held_out.items():
                    metrics[f"{split}_loss"] = float(loss_fn(model(a_s), y_s))
            return metrics

        return ProblemInstance(
            model=model, loss_fn=loss_fn, next_batch=lambda: (a, y), evaluate=evaluate
        )
