"""SLQ: moments against tr(A^j)/n within their statistical tolerance, exactness, cost."""

from __future__ import annotations

import math

import pytest
import torch

from curvlab import CountingOperator, spectral_density
from curvlab.operators import DenseOperator


def matrix(n: int = 60) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.linspace(-1, 2, n, dtype=torch.float64) ** 3
    return Q @ torch.diag(ev) @ Q.T


@pytest.mark.parametrize("j", [0, 1, 2, 3, 4])
def test_moments_match_exact_within_statistical_tolerance(j):
    A = matrix()
    n, p = A.shape[0], 20
    esd = spectral_density(
        A, num_probes=p, lanczos_steps=10, generator=torch.Generator().manual_seed(j)
    )
    B = torch.linalg.matrix_power(A, j)
    exact = float(B.trace()) / n
    # per probe: zᵀBz/n with Var = 2(‖B‖_F² − Σ b_ii²)/n²; mean of p probes
    sd = math.sqrt(2 * (float((B * B).sum()) - float((B.diagonal() ** 2).sum()))) / n / math.sqrt(p)
    assert abs(float(esd.moment(j)) - exact) <= 4 * sd + 1e-10


def test_quadrature_is_exact_per_probe_for_low_degree_polynomials():
    A = matrix(30)
    esd = spectral_density(
        A, num_probes=3, lanczos_steps=5, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(esd.weights.sum(1), torch.ones(3, dtype=torch.float64))
    # full Lanczos (m = n) recovers the eigenvalues themselves as nodes
    full = spectral_density(
        A, num_probes=1, lanczos_steps=30, generator=torch.Generator().manual_seed(1)
    )
    exact = torch.linalg.eigvalsh(A)
    torch.testing.assert_close(full.nodes[0], exact, atol=1e-8, rtol=0)


def test_density_integrates_to_one_and_costs_probes_times_steps():
    op = CountingOperator(DenseOperator(matrix()))
    esd = spectral_density(
        op, num_probes=4, lanczos_steps=16, generator=torch.Generator().manual_seed(0)
    )
    assert op.num_matvecs == esd.num_matvecs == 64
    dx = float(esd.grid[1] - esd.grid[0])
    assert abs(float(esd.density.sum()) * dx - 1.0) < 1e-3
    # products are taken in blocks of num_probes columns (lockstep Lanczos)
    assert op.num_calls == 16


def test_invariant_subspace_breakdown_gives_zero_weight_to_extra_nodes():
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    esd = spectral_density(
        A, num_probes=2, lanczos_steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(esd.nodes).all()
    torch.testing.assert_close(esd.moment(1), torch.tensor(1.5, dtype=torch.float64))
