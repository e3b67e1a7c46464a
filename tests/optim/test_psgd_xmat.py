"""PSGDXMat: float64 reference loop with the dense X matrix from the author's algorithm (whitening,
Hessian-vector products, finite differences), the Newton fixed point P = H⁻¹, and the rule's
closed form."""

from __future__ import annotations

import pytest
import torch

from curvlab.errors import ClosureRequiredError
from curvlab.optim import PSGDXMat
from curvlab.optim._psgd import mix_seed
from curvlab.optim.psgd_xmat import precond_grad_xmat, update_precond_xmat
from tests.optim import _psgd_reference as ref

DT = torch.float64
N = 17  # W: 3 x 4 and b: 5, odd, so the centre entry is covered


def x_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Q = diag(a) + adiag(b), Q[i, N-1-i] = b_i (the centre gets a_c + b_c)."""
    return torch.diag(a) + torch.diag(b) @ torch.eye(len(a), dtype=a.dtype).flip(0)


def ref_xmat_fit(Q, L, v, h, lr=0.1, beta=0.9):
    """Li's XMat fit with the dense Q: A = Qh, B = Q⁻ᵀv, E = the X-shaped part of AAᵀ - BBᵀ
    (centre of the anti-diagonal dropped), Q ← Q - lr/L · E Q, L the EMA of max diag(AAᵀ + BBᵀ)."""
    n = Q.shape[0]
    A = Q @ h
    B = torch.linalg.solve(Q.T, v)
    G = A @ A.T - B @ B.T
    J = torch.eye(n, dtype=DT).flip(0)
    anti = torch.diagonal(G.flip(1)).clone()  # G[i, n-1-i]
    if n % 2 == 1:
        anti[n // 2] = 0
    E = torch.diag(torch.diagonal(G)) + torch.diag(anti) @ J
    ell = (A * A + B * B).max()
    L = max(beta * L + (1 - beta) * ell, ell)
    return Q - lr / L * E @ Q, L


def _state_q(opt, ps):
    a = torch.cat([opt.state[p]["a"] for p in ps])
    b = torch.cat([opt.state[p]["b"] for p in ps])
    return x_matrix(a, b)


@pytest.mark.parametrize(("mom", "beta"), [(0.0, 0.0), (0.5, 0.9)])
def test_whitening_matches_reference_loop(mom, beta):
    loss, W0, b0 = ref.problem()
    p1, p2 = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
    opt = PSGDXMat([p1, p2], lr=0.01, momentum=mom, beta_lipschitz=beta, seed=5,
                   preconditioner_update_probability=1.0)  # fmt: skip
    x = torch.cat([W0.reshape(-1), b0]).reshape(-1, 1)
    Q, L, m = None, 0.0, torch.zeros(N, 1, dtype=DT)
    for t in range(8):
        gr, scale = ref.whitening_step(opt, loss, (p1, p2), x)
        if Q is None:
            Q = scale * torch.eye(N, dtype=DT)
        bt = min(t / (t + 1), mom)
        m = bt * m + (1 - bt) * gr
        gen = torch.Generator().manual_seed(mix_seed(5, t, 1))
        v = torch.randn(N, 1, dtype=DT, generator=gen)
        h = gr + (1e-9 + torch.finfo(DT).eps * gr.abs()) * v
        Q, L = ref_xmat_fit(Q, L, v, h, beta=beta)
        u = Q.T @ Q @ (m if mom > 0 else gr)
        rms = u.square().mean().sqrt()
        u = (u * 2.0 / rms if rms > 2.0 else u).clamp(-10.0, 10.0)
        x = x - 0.01 * u
    got = torch.cat([p1.detach().reshape(-1), p2.detach()])
    torch.testing.assert_close(got, x[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_state_q(opt, (p1, p2)), Q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fit", ["hvp", "finite_difference"])
def test_newton_fit_matches_reference_loop(fit):
    """The XMat class with preconditioner_type="Newton" (prob 1, no momentum, no clip): v ~ N(0, I)
    per parameter, h = Hv (double backward) or (g(θ+δv) - g(θ))/δ, h damped, the on-the-fly scale
    (mean v²)^¼ (mean h⁴)^(-⅛), the fit on (v, h) first, then θ ← θ - lr P g."""
    loss, W0, b0 = ref.problem()
    p1, p2 = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
    inf = float("inf")
    opt = PSGDXMat([p1, p2], lr=0.3, seed=5, fit=fit, grad_clip_max_amps=(inf, inf),
                   beta_lipschitz=0.0, preconditioner_update_probability=1.0)  # fmt: skip
    x = torch.cat([W0.reshape(-1), b0])
    Q, L = None, 0.0
    f = ref.flat_loss(loss)
    tol = {"rtol": 1e-9, "atol": 1e-11} if fit == "hvp" else {"rtol": 1e-5, "atol": 1e-7}
    for t in range(20):
        opt.step(lambda: loss(p1, p2))
        grad, v, hv = ref.newton_pair(f, x, t, fit, seed=5)
        if Q is None:
            Q = ref.pair_scale(v, hv) * torch.eye(N, dtype=DT)
        h = ref.damped(hv, torch.Generator().manual_seed(mix_seed(5, t, 1)))
        Q, L = ref_xmat_fit(Q, L, v[:, None], h[:, None], beta=0.0)
        x = x - 0.3 * Q.T @ Q @ grad
        torch.testing.assert_close(torch.cat([p1.detach().reshape(-1), p2.detach()]), x, **tol)
    torch.testing.assert_close(_state_q(opt, (p1, p2)), Q, **tol)


def test_precond_grad_is_qtq_times_g():
    g = torch.Generator().manual_seed(0)
    for n in (6, 7):
        a, b, x = (torch.randn(n, dtype=DT, generator=g) for _ in range(3))
        b[n // 2] = 0.0 if n % 2 else b[n // 2]
        Q = x_matrix(a, b)
        torch.testing.assert_close(precond_grad_xmat(a, b, x), Q.T @ Q @ x, rtol=1e-12, atol=1e-12)


def test_newton_fit_recovers_the_inverse_of_an_x_shaped_hessian():
    """Exact pairs (v, Hv) with H = diag + adiag SPD (eigenvalues in 0.5 … 8): P = QᵀQ → H⁻¹, the
    fixed point of E[hᵀPh + vᵀP⁻¹v], which the X family contains. Relative error after 3000 fits
    measured 1e-11, 1e-12, 2e-9 (seeds 0, 1, 2) from 2.9, 1.0, 1.6; asserted < 1e-6."""
    n = 8
    gen = torch.Generator().manual_seed(0)
    c, s = torch.rand(n // 2, dtype=DT, generator=gen), torch.rand(n // 2, dtype=DT, generator=gen)
    lam1, lam2 = 0.5 + 7.5 * c, 0.5 + 7.5 * s  # the 2 x 2 blocks [[p, q], [q, r]] by eigenvalues
    p, r = (lam1 + lam2) / 2, (lam1 + lam2) / 2
    q = (lam1 - lam2) / 2
    H = torch.zeros(n, n, dtype=DT)
    for i in range(n // 2):
        j = n - 1 - i
        H[i, i], H[j, j], H[i, j], H[j, i] = p[i], r[i], q[i], q[i]
    target = torch.linalg.inv(H)
    a, b, L = torch.ones(n, dtype=DT), torch.zeros(n, dtype=DT), [torch.zeros([], dtype=DT)]
    err0 = torch.linalg.norm(x_matrix(a, b).T @ x_matrix(a, b) - target) / torch.linalg.norm(target)
    for it in range(3000):
        v = torch.randn(n, dtype=DT, generator=gen)
        update_precond_xmat(a, b, L, v, H @ v, lr=0.1 if it < 2000 else 0.01)
    Q = x_matrix(a, b)
    err = torch.linalg.norm(Q.T @ Q - target) / torch.linalg.norm(target)
    assert err0 > 0.5 and err < 1e-6, (float(err0), float(err))


def test_pair_fit_needs_a_loss_closure():
    w = torch.nn.Parameter(torch.ones(4))
    opt = PSGDXMat([w], fit="hvp")
    with pytest.raises(ClosureRequiredError, match=r"PSGDXMat\.step\(\) needs a closure"):
        opt.step()
