"""M-FAC: exact inverse-Fisher products, a reference loop from the paper, API checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from curvlab.errors import ParameterError, StateDictError
from curvlab.optim.mfac import MFAC, mfac_coefficient_matrix, mfac_coefficients


def dense_ihvp(rows: list[Tensor], x: Tensor, damp: float, m: int) -> Tensor:
    """(λI + (1/m) Σ g_i g_iᵀ)⁻¹ x with the dense d × d matrix, float64 (independent oracle)."""
    d = x.numel()
    F = damp * torch.eye(d, dtype=torch.float64)
    for g in rows:
        F += torch.outer(g, g) / m
    return torch.linalg.solve(F, x)


def paper_ihvp(window: Tensor, x: Tensor, damp: float) -> Tensor:
    """The paper's dynamic algorithm written with explicit loops (arXiv 2107.03356, Sec. 3).

    Woodbury recursion F_0⁻¹ = I/λ,
    F_k⁻¹ = F_{k−1}⁻¹ − F_{k−1}⁻¹g_k (F_{k−1}⁻¹g_k)ᵀ / (m + g_kᵀF_{k−1}⁻¹g_k), kept matrix-free by
    D[i, j] = g_iᵀ F_{i−1}⁻¹ g_j (j ≥ i) and F_{k−1}⁻¹ g_k = Σ_{j≤k} B[k, j] g_j.
    """
    m = window.shape[0]
    lam = 1.0 / damp
    G = window.to(torch.float64)
    D = torch.zeros(m, m, dtype=torch.float64)
    B = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(i, m):
            D[i, j] = lam * G[i] @ G[j] - sum(D[k, i] * D[k, j] / (m + D[k, k]) for k in range(i))
        B[i, i] = lam
        for j in range(i):
            B[i, j] = -sum(D[k, i] / (m + D[k, k]) * B[k, j] for k in range(j, i))
    q = torch.zeros(m, dtype=torch.float64)  # q_k = g_kᵀ F_{k−1}⁻¹ x
    for k in range(m):
        q[k] = lam * G[k] @ x - sum(D[j, k] * q[j] / (m + D[j, j]) for j in range(k))
    out = lam * x.clone()
    for k in range(m):
        out -= q[k] / (m + D[k, k]) * (B[k, : k + 1] @ G[: k + 1])
    return out


def test_mfac_coefficients_equal_the_dense_inverse() -> None:
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    G[4] = 0.0  # an unfilled row of the window
    x = torch.randn(9, generator=gen, dtype=torch.float64)
    for damp in (1e-5, 1e-2, 3.0):
        c = mfac_coefficients(G @ G.T, G @ x, damp, 5)
        got = x / damp - G.T @ c
        want = dense_ihvp(list(G), x, damp, 5)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())
        tol = 1e-8 * want.abs().max().item()
        torch.testing.assert_close(paper_ihvp(G, x, damp), want, rtol=1e-8, atol=tol)


@pytest.mark.parametrize("damp", [1e-5, 1e-1])
def test_step_is_exact_inverse_fisher_product_across_wraparound(damp: float) -> None:
    """lr = 1, μ = 0: θ_t − θ_{t+1} = (λI + (1/m) Σ_{last m} g gᵀ)⁻¹ g_t; 11 steps, window of 4."""
    gen = torch.Generator().manual_seed(0)
    a = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    m = 4
    opt = MFAC([a, b], lr=1.0, num_grads=m, damp=damp)
    history: list[Tensor] = []
    for _ in range(11):
        g = torch.randn(10, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g[:6].view(3, 2).clone(), g[6:].clone()
        before = torch.cat([a.detach().reshape(-1), b.detach()])
        opt.step()
        after = torch.cat([a.detach().reshape(-1), b.detach()])
        history.append(g)
        want = dense_ihvp(history[-m:], g, damp, m)
        tol = 1e-9 * want.abs().max().item()
        torch.testing.assert_close(before - after, want, rtol=1e-9, atol=tol)
    # the window holds the last m gradients in ring order
    window = torch.cat([opt.state[a]["grad_window"], opt.state[b]["grad_window"]], dim=1)
    ring = [history[t] for t in range(11 - m, 11)]
    order = [t % m for t in range(11 - m, 11)]
    for row, g in zip(order, ring):
        assert torch.equal(window[row], g)


def reference_mfac(
    model: nn.Module, batches: list, lr: float, mu: float, wd: float, m: int, damp: float
) -> tuple[list[Tensor], Tensor]:
    """Plain loop of the official optimizer (optim.MFAC) with the paper's dynamic IHVP, float64."""
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    G = torch.zeros(m, d, dtype=torch.float64)
    v = torch.zeros(d, dtype=torch.float64)
    for t, (X, y) in enumerate(batches):
        for p in params:
            p.grad = None
        nn.functional.cross_entropy(model(X), y).backward()
        with torch.no_grad():
            g = torch.cat([(p.grad + wd * p).reshape(-1) for p in params])
            G[t % m] = g
            u = paper_ihvp(G, g, damp)
            if mu > 0:
                v = mu * v + (1 - mu) * u
                u = v
            off = 0
            for p in params:
                p -= lr * u[off : off + p.numel()].view_as(p)
                off += p.numel()
    return [p.detach().clone() for p in params], v


def _mlp(gen: torch.Generator) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


@pytest.mark.parametrize(("mu", "wd"), [(0.0, 0.0), (0.9, 0.01)])
def test_matches_reference_loop_from_the_paper(mu: float, wd: float) -> None:
    gen = torch.Generator().manual_seed(3)
    model = _mlp(gen)
    ref_model = copy.deepcopy(model)
    batches = [
        (
            torch.randn(6, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 2, (6,), generator=gen),
        )
        for _ in range(5)
    ]
    m, lr, damp = 3, 0.05, 0.1
    opt = MFAC(model.parameters(), lr=lr, momentum=mu, weight_decay=wd, num_grads=m, damp=damp)
    for X, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    want, v = reference_mfac(ref_model, batches, lr, mu, wd, m, damp)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-11, atol=1e-13)
    if mu > 0:
        got_v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got_v, v, rtol=1e-11, atol=1e-13)
    assert int(opt.state[next(model.parameters())]["step"]) == 5


def _quadratic_run(steps: int, **kw: float) -> float:
    A = torch.logspace(0, 1, 8, dtype=torch.float64)
    x_star = torch.linspace(-1, 1, 8, dtype=torch.float64)
    x = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    opt = MFAC([x], **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (A * (x - x_star) ** 2).sum()).backward()
        opt.step()
        sched.step()
    return (x.detach() - x_star).norm().item()


def _rosenbrock_run(steps: int, **kw: float) -> float:
    x = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    opt = MFAC([x], **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        ((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2).backward()
        opt.step()
        sched.step()
    return (x.detach() - 1.0).norm().item()


def test_converges_on_a_quadratic_and_on_rosenbrock() -> None:
    kw = {"lr": 0.1, "num_grads": 8, "damp": 1.0, "momentum": 0.9}
    assert _quadratic_run(500, **kw) < 1e-6
    assert _rosenbrock_run(3000, **kw) < 1e-6


def test_state_dict_round_trip_mid_window_is_bit_identical() -> None:
    gen = torch.Generator().manual_seed(5)
    model = _mlp(gen)
    X = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen)

    def step(o: MFAC, mdl: nn.Module) -> None:
        o.zero_grad()
        nn.functional.cross_entropy(mdl(X), y).backward()
        o.step()

    opt = MFAC(model.parameters(), lr=0.01, momentum=0.5, num_grads=3, damp=0.1)
    for _ in range(4):  # wrapped once
        step(opt, model)
    model2 = copy.deepcopy(model)
    opt2 = MFAC(model2.parameters(), lr=0.01, momentum=0.5, num_grads=3, damp=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        step(opt, model)
        step(opt2, model2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k])


def test_state_memory_is_m_times_d_floats() -> None:
    """Window m·d + G Gᵀ m² + one float32 step per parameter; + d for momentum."""
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    d = sum(p.numel() for p in model.parameters())
    for mu, extra in ((0.0, 0), (0.9, d)):
        opt = MFAC(model.parameters(), lr=1e-3, momentum=mu, num_grads=16, damp=1e-3)
        model.zero_grad()
        model(torch.randn(4, 10)).sum().backward()
        opt.step()
        nbytes = sum(
            v.numel() * v.element_size()
            for st in opt.state.values()
            for v in st.values()
            if isinstance(v, Tensor)
        )
        n_params = len(list(model.parameters()))
        assert nbytes == 4 * (16 * d + 16 * 16 + extra + n_params)  # float32


def test_parameter_without_grad_gets_a_zero_row_and_is_not_updated() -> None:
    a = nn.Parameter(torch.ones(2, dtype=torch.float64))
    b = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = MFAC([a, b], lr=0.1, num_grads=2, damp=1.0)
    a.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    b_before = b.detach().clone()
    a.grad, b.grad = torch.tensor([0.5, -1.0], dtype=torch.float64), None
    a_before = a.detach().clone()
    opt.step()
    assert torch.equal(b, b_before)
    assert torch.equal(opt.state[b]["grad_window"][1], torch.zeros(3, dtype=torch.float64))
    # a moved by exactly the IHVP of the full vector (a's grad, zeros for b)
    rows = [
        torch.tensor([1.0, 2.0, 1, 1, 1], dtype=torch.float64),
        torch.tensor([0.5, -1.0, 0, 0, 0], dtype=torch.float64),
    ]
    want = dense_ihvp(rows, rows[1], 1.0, 2)[:2]
    torch.testing.assert_close(a_before - a.detach(), 0.1 * want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, r"lr must be a finite number >= 0"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\)"),
        ({"weight_decay": -1.0}, r"weight_decay must be a finite number >= 0"),
        ({"num_grads": 0}, r"num_grads must be an int >= 1"),
        ({"num_grads": 2.5}, r"num_grads must be an int >= 1"),
        ({"damp": 0.0}, r"damp must be a finite number > 0"),
        ({"on_nonfinite": "warn"}, r"on_nonfinite must be one of"),
    ],
)
def test_bad_hyperparameters_raise_their_message(kwargs: dict, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        MFAC([nn.Parameter(torch.zeros(2))], **kwargs)


def test_mixed_dtypes_in_one_group_raise() -> None:
    with pytest.raises(ParameterError, match="share one dtype and device"):
        MFAC([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))])


def test_load_state_dict_with_other_window_length_raises() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = MFAC([p], num_grads=4)
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    q = nn.Parameter(torch.zeros(3))
    other = MFAC([q], num_grads=4)
    sd["param_groups"][0]["num_grads"] = 5
    with pytest.raises(StateDictError, match="num_grads"):
        other.load_state_dict(sd)


def test_mfac_coefficient_matrix_equals_the_columnwise_coefficients() -> None:
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    X = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    C = mfac_coefficient_matrix(G @ G.T, G @ X, 0.3, 5)
    for j in range(4):
        assert torch.allclose(C[:, j], mfac_coefficients(G @ G.T, G @ X[:, j], 0.3, 5), rtol=1e-12)
    F = 0.3 * torch.eye(9, dtype=torch.float64) + G.T @ G / 5
    assert torch.allclose(X / 0.3 - G.T @ C, torch.linalg.solve(F, X), rtol=1e-9)


@pytest.mark.parametrize(("kwargs", "m"), [({}, 32), ({"num_grads": 1024}, 1024)])
def test_default_window_is_32_and_the_official_1024_is_reachable(kwargs, m) -> None:
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = MFAC([p], damp=1.0, **kwargs)
    p.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    opt.step()
    assert opt.state[p]["grad_window"].shape == (m, 3)
    assert opt.state[p]["dots"].shape == (m, m)
    # one gradient in the window: F = I + g gᵀ / m, so F⁻¹ g = g / (1 + |g|² / m)
    want = 1.0 - 1e-3 * p.grad / (1.0 + 14.0 / m)
    torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-15)
