"""eigsh and power_iteration against eigvalsh of dense float64 matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab import CountingOperator, HessianOperator, eigsh, power_iteration
from curvlab.errors import InvalidArgumentError, NotSymmetricError, ShapeMismatchError
from curvlab.operators import DenseOperator


def spectrum_matrix(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor([9.0, 7.5, 6.0, 5.5, 5.0]), torch.linspace(-2.0, 3.0, n - 5)])
    ev = ev.double()
    A = Q @ torch.diag(ev) @ Q.T
    return (A + A.T) / 2, torch.linalg.eigvalsh((A + A.T) / 2)


def test_k_equals_n_reproduces_eigvalsh():
    A, exact = spectrum_matrix(40)
    res = eigsh(A, k=40, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert res.converged
    torch.testing.assert_close(res.values.flip(0), exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_top_and_bottom_k_match_to_1e8(which):
    A, exact = spectrum_matrix()
    res = eigsh(A, k=5, which=which, tol=1e-10, generator=torch.Generator().manual_seed(1))
    want = {"LA": exact.flip(0)[:5], "SA": exact[:5]}.get(which)
    if which == "LM":
        want = exact[exact.abs().argsort(descending=True)][:5]
    assert res.converged
    torch.testing.assert_close(res.values, want, rtol=1e-8, atol=0)
    # eigenvectors: orthonormal and A v = λ v within the reported residuals
    V = res.vectors
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    resid = (A @ V - V * res.values).norm(dim=0)
    assert torch.all(resid <= res.residuals + 1e-10)


def test_thick_restart_keeps_accuracy_with_a_small_basis():
    A, exact = spectrum_matrix()
    res = eigsh(A, k=3, tol=1e-10, max_basis=8, generator=torch.Generator().manual_seed(2))
    assert res.converged
    torch.testing.assert_close(res.values, exact.flip(0)[:3], rtol=1e-8, atol=0)


def test_residual_bound_holds_at_loose_tolerance():
    A, exact = spectrum_matrix()
    res = eigsh(A, k=1, tol=1e-2, generator=torch.Generator().manual_seed(3))
    assert res.converged
    assert abs(float(res.values[0]) - float(exact[-1])) <= float(res.residuals[0])
    assert float(res.residuals[0]) <= 1e-2 * abs(float(res.values[0]))


def test_counts_matvecs_exactly():
    A, _ = spectrum_matrix()
    op = CountingOperator(DenseOperator(A))
    res = eigsh(op, k=2, tol=1e-8, generator=torch.Generator().manual_seed(0))
    assert res.num_matvecs == op.num_matvecs


def test_budget_exhaustion_reports_not_converged():
    A, _ = spectrum_matrix()
    res = eigsh(A, k=5, tol=1e-12, max_iter=6, generator=torch.Generator().manual_seed(0))
    assert not res.converged
    assert res.num_matvecs == 6


def test_warm_start_from_the_eigenvector_converges_in_very_few_products():
    A, exact = spectrum_matrix()
    cold = eigsh(A, k=1, tol=1e-8, generator=torch.Generator().manual_seed(0))
    warm = eigsh(A, k=1, tol=1e-8, v0=cold.vectors[:, 0])
    assert warm.num_matvecs <= 2 < cold.num_matvecs
    torch.testing.assert_close(warm.values, exact[-1:], rtol=1e-8, atol=0)


def test_hessian_top_and_bottom_eigenvalues_of_a_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    exact = torch.linalg.eigvalsh(H.to_dense())
    top = eigsh(H, k=3, tol=1e-10, generator=torch.Generator().manual_seed(0))
    bottom = eigsh(H, k=2, which="SA", tol=1e-10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top.values, exact.flip(0)[:3], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(bottom.values, exact[:2], rtol=1e-8, atol=1e-12)
    assert float(bottom.values[0]) < 0  # a tanh network's Hessian is indefinite


def test_power_iteration_baseline():
    A = torch.diag(torch.tensor([10.0, -8.0, 3.0, 1.0], dtype=torch.float64))
    res = power_iteration(
        A, k=2, tol=1e-9, max_matvecs=2000, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(res.values, torch.tensor([10.0, -8.0], dtype=torch.float64))
    assert res.converged


def test_bad_inputs():
    A, _ = spectrum_matrix(10)
    with pytest.raises(InvalidArgumentError, match="k = 11"):
        eigsh(A, k=11)
    with pytest.raises(NotSymmetricError, match="symmetric"):
        eigsh(torch.triu(A))
    with pytest.raises(ValueError, match="which"):
        eigsh(A, which="BE")
    with pytest.raises(ShapeMismatchError, match="v0"):
        eigsh(A, v0=torch.ones(3, dtype=torch.float64))
