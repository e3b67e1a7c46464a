"""curvlab.solve: CG, MINRES and Neumann against dense float64 solves; the CG product bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.errors import (
    IndefiniteSystemError,
    InvalidArgumentError,
    NotConvergedError,
    NotSymmetricError,
    UnknownOptionError,
)
from curvlab.operators import CountingOperator, DenseOperator, GGNOperator, HessianOperator
from tests.reference.dense import dense_ggn_of_loss, dense_hessian

DT = torch.float64


def _spd(n: int, kappa: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    ev = torch.logspace(0, math.log10(kappa), n, dtype=DT)
    a = q @ torch.diag(ev) @ q.T
    return (a + a.T) / 2


def _mlp_data(seed: int = 1) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    return model, torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))


def _cnn_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(
        DT
    )
    return model, torch.randn(8, 1, 6, 6, dtype=DT), torch.randint(0, 3, (8,))


@pytest.mark.parametrize("build", [_mlp_data, _cnn_data])
def test_cg_on_a_ggn_matches_a_dense_solve(build):
    model, x, y = build()
    loss = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    dense = dense_ggn_of_loss(model, loss, x, y, names) + 1e-3 * torch.eye(
        sum(p.numel() for p in model.parameters()), dtype=DT
    )
    G = GGNOperator(model, loss, (x, y))
    b = torch.randn(G.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    sol = cl.solve(G, b, damping=1e-3, tol=1e-13)
    assert sol.converged and sol.x.shape == b.shape and sol.residual_norm.shape == (2,)
    ref = torch.linalg.solve(dense, b)
    assert torch.allclose(sol.x, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_damped_hessian_minres_and_cg_match_dense():
    model, x, y = _mlp_data(3)
    loss = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, loss, [(x, y)], names)
    op = HessianOperator(model, loss, (x, y))
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    b = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    damping = max(0.0, -lam_min) + 0.05
    ref = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=DT), b)
    for method in ("cg", "minres"):
        sol = cl.solve(op, b, damping=damping, method=method, tol=1e-13)
        assert sol.converged
        assert torch.allclose(sol.x, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max())), method


def test_minres_on_an_indefinite_system():
    a = _spd(40, 10.0) - 5.0 * torch.eye(40, dtype=DT)  # eigenvalues in [-4, 5], none near 0
    b = torch.randn(40, dtype=DT)
    sol = cl.solve(a, b, method="minres", tol=1e-12)
    assert sol.converged
    assert torch.allclose(sol.x, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-10)


def test_neumann_series_is_the_truncated_sum():
    a = _spd(20, 5.0)
    b = torch.randn(20, dtype=DT)
    alpha, terms = 0.2, 7
    sol = cl.solve(a, b, method="neumann", scale=alpha, max_matvecs=terms, tol=1e-300)
    m = torch.eye(20, dtype=DT) - alpha * a
    ref = alpha * sum(torch.linalg.matrix_power(m, j) @ b for j in range(terms))
    # J products: x holds the series' first J terms (each product also gives the residual)
    assert sol.num_matvecs == terms and not sol.converged
    assert torch.allclose(sol.x, ref, rtol=1e-12, atol=1e-12)
    full = cl.solve(a, b, method="neumann", tol=1e-11)  # scale from Lanczos
    assert full.converged
    assert torch.allclose(full.x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kappa", [1e2, 1e4])
def test_cg_products_stay_under_the_textbook_bound(kappa):
    # ‖e_j‖_A <= 2 ((√κ-1)/(√κ+1))^j ‖e_0‖_A, and ‖r‖/‖b‖ <= √κ ‖e‖_A/‖e_0‖_A, so a relative
    # residual tol needs at most ½ √κ log(2√κ / tol) products (Saad 2003, Thm. 6.29)
    n, tol = 300, 1e-10
    A = CountingOperator(DenseOperator(_spd(n, kappa), psd=True))
    b = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(3))
    sol = cl.solve(A, b, tol=tol)
    bound = 0.5 * math.sqrt(kappa) * math.log(2 * math.sqrt(kappa) / tol)
    assert sol.converged and sol.num_matvecs == A.num_matvecs
    assert sol.num_matvecs <= math.ceil(bound)
    assert sol.num_matvecs <= math.sqrt(kappa) * math.log(2 / tol)  # the issue's √κ·log(2/ε)


def test_preconditioned_cg_with_the_exact_diagonal():
    d = torch.logspace(0, 6, 50, dtype=DT)
    a = torch.diag(d) + 1e-3 * _spd(50, 2.0)
    b = torch.randn(50, dtype=DT)
    plain = cl.solve(a, b, tol=1e-10)
    pcg = cl.solve(a, b, tol=1e-10, preconditioner=lambda r: r / a.diagonal())
    assert pcg.converged and pcg.num_matvecs < plain.num_matvecs / 3
    assert torch.allclose(pcg.x, torch.linalg.solve(a, b), rtol=1e-8)


def test_x0_and_budget():
    a, b = _spd(30, 100.0), torch.randn(30, dtype=DT)
    ref = torch.linalg.solve(a, b)
    warm = cl.solve(a, b, x0=ref, tol=1e-8)
    assert warm.converged and warm.num_matvecs == 1
    short = cl.solve(a, b, max_matvecs=3)
    assert short.num_matvecs == 3 and not short.converged


def test_inverse_operator_matches_dense_inverse():
    a = _spd(25, 50.0)
    inv = DenseOperator(a, psd=True).inverse(damping=0.1)
    assert inv.is_symmetric and inv.is_psd and inv.shape == (25, 25)
    ref = torch.linalg.inv(a + 0.1 * torch.eye(25, dtype=DT))
    assert torch.allclose(inv.to_dense(), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(NotConvergedError, match="raise max_matvecs"):
        DenseOperator(a).inverse(max_matvecs=2) @ torch.ones(25, dtype=DT)


def _singular() -> torch.Tensor:
    a = _spd(30, 3.0)
    w, v = torch.linalg.eigh(a)
    w[:4] = 0.0
    return v @ torch.diag(w) @ v.T


BAD = [
    (lambda: cl.solve(_spd(10, 2.0) - 1.5 * torch.eye(10, dtype=DT), torch.ones(10, dtype=DT)),
     IndefiniteSystemError, "non-positive curvature"),
    (lambda: cl.solve(_singular(), torch.randn(30, dtype=DT)),
     IndefiniteSystemError, "method='minres'"),
    (lambda: cl.solve(_spd(5, 2.0), torch.ones(5, dtype=DT), damping=-1e-3),
     InvalidArgumentError, "damping must be finite and >= 0"),
    (lambda: DenseOperator(_spd(5, 2.0)).inverse(damping=-1.0),
     InvalidArgumentError, "damping must be finite and >= 0"),
    (lambda: cl.solve(_spd(5, 2.0), torch.ones(5, dtype=DT), method="gmres"),
     UnknownOptionError, "unknown solve method 'gmres'"),
    (lambda: cl.solve(torch.ones(3, 4, dtype=DT), torch.ones(3, dtype=DT)),
     NotSymmetricError, "solve needs a symmetric operator"),
    (lambda: cl.solve(_spd(5, 2.0), torch.ones(5, dtype=DT), method="minres",
                      preconditioner=lambda r: r),
     InvalidArgumentError, "method='cg' only"),
    (lambda: cl.solve(_spd(5, 10.0), torch.ones(5, dtype=DT), method="neumann", scale=1.0),
     InvalidArgumentError, "Neumann series diverges"),
    (lambda: cl.solve(_spd(5, 2.0), torch.ones(5, dtype=DT), tol=0.0),
     InvalidArgumentError, "tol must be finite and > 0"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "exc", "fragment"), BAD)
def test_bad_input(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


def test_indefinite_error_carries_the_direction():
    a = torch.diag(torch.tensor([1.0, 2.0, -6.0], dtype=DT))
    with pytest.raises(IndefiniteSystemError) as info:
        cl.solve(a, torch.ones(3, dtype=DT))
    p = info.value.direction
    assert float(p @ a @ p) <= 0 and abs(float(p.norm()) - 1) < 1e-12
    assert info.value.curvature <= 0 and info.value.num_matvecs >= 1
