"""Newton: damped (AICN step), regularized (Mishchenko) and saddle-free against dense float64 loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import hessian

from curvlab.errors import ClosureRequiredError, IndefiniteSystemError, ParameterError
from curvlab.optim import Newton, create

DT = torch.float64


def _objective(w: torch.Tensor) -> torch.Tensor:
    """A smooth strictly convex test function (log-sum-exp plus a quadratic)."""
    a = torch.arange(1.0, 13.0, dtype=DT).view(4, 3).sin()
    return torch.logsumexp(a @ w, 0) + 0.05 * (w**2).sum() + 0.1 * w[0] ** 4


def _nonconvex(w: torch.Tensor) -> torch.Tensor:
    return (w[0] ** 2 - 1) ** 2 + 0.5 * w[1] ** 2 - 0.3 * w[2] ** 2 + w[0] * w[2] + 0.1 * w[1] ** 4


def _reference(f, w0, steps, method, damping=0.0, lip=None):
    """Dense Newton loop from the papers' pseudo-code (exact Hessian, exact solves)."""
    w = w0.clone()
    out = []
    for _ in range(steps):
        g = torch.func.grad(f)(w)
        H = hessian(f)(w)
        n = w.numel()
        if method == "saddle-free":
            lam, U = torch.linalg.eigh(H)
            d = U @ ((U.T @ g) / (lam.abs() + damping))
            alpha = 1.0
        else:
            shift = damping + (math.sqrt(lip * float(g.norm())) if method == "regularized" else 0)
            d = torch.linalg.solve(H + shift * torch.eye(n, dtype=DT), g)
            alpha = 1.0
            if method == "damped" and lip is not None:
                G = math.sqrt(float(g @ d))
                alpha = (math.sqrt(1 + 2 * lip * G) - 1) / (lip * G)
        w = w - alpha * d
        out.append(w.clone())
    return out


def _run(f, w0, steps, **kwargs):
    w = w0.clone().requires_grad_(True)
    opt = Newton([w], tol=1e-13, **kwargs)
    out = []
    for _ in range(steps):
        opt.step(lambda: f(w))
        out.append(w.detach().clone())
    return out, opt


CASES = [
    (_objective, "damped", {}, None),
    (_objective, "damped", {"hessian_lipschitz": 2.0}, 2.0),
    (_objective, "regularized", {"hessian_lipschitz": 0.5}, 0.5),
    (_nonconvex, "saddle-free", {"damping": 1e-2, "krylov_dim": 3}, None),
    (_nonconvex, "damped", {"solver": "minres"}, None),
]


@pytest.mark.parametrize(("f", "method", "kwargs", "lip"), CASES)
def test_trajectory_matches_the_dense_reference(f, method, kwargs, lip):
    w0 = torch.tensor([0.7, -0.4, 0.3], dtype=DT)
    got, _ = _run(f, w0, 4, method=method, **kwargs)
    ref = _reference(f, w0, 4, method, kwargs.get("damping", 0.0), lip)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_quadratic_convergence_and_state():
    w0 = torch.tensor([1.5, -1.0, 0.5], dtype=DT)
    traj, opt = _run(_objective, w0, 8, method="damped")
    w_star = traj[-1]
    errs = [float((w - w_star).norm()) for w in traj[:5]]
    # e_{t+1} <= C e_t² with a modest C near the optimum
    assert errs[3] <= 10 * errs[2] ** 2 + 1e-14
    st = opt.state[next(iter(opt.state))]
    assert int(st["step"]) == 8 and st["num_matvecs"] >= 1 and st["step_size"] == 1.0


def test_multiple_groups_share_one_hessian_and_keep_their_lr():
    a = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    b = torch.tensor([-1.0], dtype=DT, requires_grad=True)
    opt = Newton([{"params": [a]}, {"params": [b], "lr": 0.5}])
    H = torch.tensor([[2.0, 0.5, 0.0], [0.5, 3.0, 1.0], [0.0, 1.0, 4.0]], dtype=DT)
    w0 = torch.cat([a, b]).detach()
    opt.step(lambda: 0.5 * torch.cat([a, b]) @ H @ torch.cat([a, b]))
    d = torch.linalg.solve(H, H @ w0)  # the full Newton step is w0 itself
    assert torch.allclose(a.detach(), w0[:2] - d[:2]) and torch.allclose(
        b.detach(), w0[2:] - 0.5 * d[2:]
    )


def test_plain_newton_is_attracted_to_a_saddle_saddle_free_is_not():
    f = lambda w: w[0] ** 2 - w[1] ** 2 + w[1] ** 4  # noqa: E731 - saddle at 0, minima at w1=±1/√2
    w0 = torch.tensor([0.3, 0.05], dtype=DT)
    plain, _ = _run(f, w0, 10, method="damped", solver="minres")
    free, _ = _run(f, w0, 30, method="saddle-free", damping=1e-3)
    assert float(plain[-1].norm()) < 1e-8
    assert abs(abs(float(free[-1][1])) - 1 / math.sqrt(2)) < 1e-8


def test_registry_and_cg_on_an_indefinite_hessian():
    w = torch.tensor([0.0, 0.1], dtype=DT, requires_grad=True)
    opt = create("newton", [w])
    assert isinstance(opt, Newton)
    with pytest.raises(IndefiniteSystemError, match='solver="minres"') as info:
        opt.step(lambda: w[0] ** 2 - w[1] ** 2)
    # the advice is in Newton's keywords (method= names the Newton variant here) and it works
    assert "method='minres'" not in str(info.value) and info.value.curvature < 0
    assert torch.equal(w.detach(), torch.tensor([0.0, 0.1], dtype=DT)) and not opt.state[w]
    opt = create("newton", [w], solver="minres")
    opt.step(lambda: w[0] ** 2 - w[1] ** 2)
    assert torch.allclose(w.detach(), torch.zeros(2, dtype=DT))  # the saddle, in one step


BAD = [
    ({"damping": -1.0}, ParameterError, "damping must be a finite number >= 0"),
    ({"method": "bfgs"}, ParameterError, "method must be one of damped, regularized, saddle-free"),
    ({"solver": "lu"}, ParameterError, "solver must be one of cg, minres, neumann"),
    ({"method": "regularized"}, ParameterError, "needs hessian_lipschitz"),
    ({"hessian_lipschitz": 0.0}, ParameterError, "hessian_lipschitz must be a finite number > 0"),
    ({"krylov_dim": 0}, ParameterError, "krylov_dim must be an integer >= 1"),
    ({"lr": -1.0}, ParameterError, "lr must be a finite number >= 0"),
]


@pytest.mark.parametrize(("kwargs", "exc", "fragment"), BAD)
def test_bad_hyper_parameters(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        Newton([torch.zeros(2, requires_grad=True)], **kwargs)


def test_closure_contract():
    w = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = Newton([w])
    with pytest.raises(ClosureRequiredError, match="WITHOUT calling backward"):
        opt.step()

    def calls_backward():
        loss = (w**2).sum()
        loss.backward()
        return loss

    with pytest.raises(ClosureRequiredError, match="called backward"):
        opt.step(calls_backward)


def test_lanczos_basis_stops_where_the_krylov_space_is_exhausted():
    from curvlab.operators.base import DenseOperator
    from curvlab.optim.newton import lanczos_basis

    A = torch.diag(torch.arange(1.0, 7.0, dtype=DT))
    v0 = torch.tensor([1.0, 1.0, 0, 0, 0, 0], dtype=DT)  # spans an invariant 2-dim subspace
    V, T, products = lanczos_basis(DenseOperator(A), v0, steps=5)
    assert V.shape == (6, 2) and T.shape == (2, 2) and products == 2  # no product after it
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=DT), atol=1e-14, rtol=0)
    torch.testing.assert_close(V.T @ A @ V, T, atol=1e-14, rtol=0)
    torch.testing.assert_close(torch.linalg.eigvalsh(T), torch.tensor([1.0, 2.0], dtype=DT))
    V, T, products = lanczos_basis(DenseOperator(A), torch.ones(6, dtype=DT), steps=4)
    assert V.shape == (6, 4) and products == 4  # a full run keeps every step
    torch.testing.assert_close(V.T @ A @ V, T, atol=1e-13, rtol=0)
