"""PSGDKron: reference loop from the authors' pseudo-code, whitening fixed points, factor rule,
convergence, bit-identical resume, error inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from curvlab.errors import ParameterError, StateDictError
from curvlab.optim._psgd import update_coin
from curvlab.optim.psgd_kron import (
    PSGDKron,
    factor_kinds,
    init_factors,
    kron_precondition,
    norm_lower_bound_spd,
    precond_update_prob_schedule,
    probe_seed,
    update_precond_kron_whiten,
)

DT = torch.float64

# --------------------------------------------------------------------------------------------------
# reference loop: explicit matrices, written from the pseudo-code of Li's psgd.py (KronWhiten)
# --------------------------------------------------------------------------------------------------


def ref_bound(A, gen, skew=False):
    """Official subspace lower bound of ||A||_2 (32 probes, 2 half-iterations)."""
    s = (A.abs().amax() if skew else A.diagonal().amax()) + torch.finfo(A.dtype).smallest_normal
    A = A / s
    r = A[torch.argmax(torch.linalg.vector_norm(A, dim=1))]
    V = torch.randn(32, A.shape[1], dtype=A.dtype, generator=gen)
    V = r + torch.sign((r * V).sum(1, keepdim=True)) * V
    for _ in range(2):
        V = V @ A
        V = V / (torch.linalg.vector_norm(V, dim=1, keepdim=True) + torch.finfo(A.dtype).tiny)
        V = V @ A
    return s * torch.linalg.vector_norm(V, dim=1).amax()


def ref_precond(Q, X):
    M = [Q[0], Q[1] if Q[1].dim() == 2 else torch.diag(Q[1])]
    return M[0].T @ M[0] @ X @ M[1].T @ M[1]


def ref_step(
    W, G, Q, L, t, gen, geometry, lr=0.01, plr=0.1, beta=0.9, damp=1e-9, mom=0.0, wd=0.0, m=None,
    first=True, whiten_m=False,
):  # fmt: skip
    """One step on a matrix W; Q = [Q0 (dense, rows), Q1 (dense or diagonal vector, columns)]."""
    W.mul_(1 - lr * wd)
    if mom > 0:
        b = min(t / (t + 1), mom)
        m.mul_(b).add_((1 - b) * G)
    if not first:
        u = ref_precond(Q, m if mom > 0 else G)
    T = m if whiten_m else G
    Vn = torch.randn(T.shape, dtype=T.dtype, generator=gen)
    h = T + (damp + torch.finfo(T.dtype).eps * T.abs()) * Vn
    M = [Q[0], Q[1] if Q[1].dim() == 2 else torch.diag(Q[1])]
    if geometry == "EQ":
        A = M[0] @ h @ M[1].T
        B = torch.linalg.inv(M[0]).T @ Vn @ torch.linalg.inv(M[1])
        grams = [(A @ A.T, B @ B.T), (A.T @ A, B.T @ B)]
        for i in range(2):
            T1, T2 = grams[i]
            if Q[i].dim() == 2:
                ell = ref_bound(T1 + T2, gen)
                L[i] = max(beta * L[i] + (1 - beta) * ell, ell)
                Q[i] = Q[i] - (plr / L[i] * torch.triu(T1 - T2)) @ Q[i]
            else:
                d1, d2 = T1.diagonal(), T2.diagonal()
                ell = (d1 + d2).max()
                L[i] = max(beta * L[i] + (1 - beta) * ell, ell)
                Q[i] = Q[i] - plr / L[i] * (d1 - d2) * Q[i]
    else:  # Q0.5EQ1.5
        Pg = M[0].T @ M[0] @ h @ M[1].T @ M[1]
        for i, T in enumerate((Pg @ Pg.T, Pg.T @ Pg)):
            c = G.numel() / Q[i].shape[0]
            if Q[i].dim() == 2:
                ell = ref_bound(T, gen) + c
                L[i] = max(beta * L[i] + (1 - beta) * ell, ell)
                q = Q[i] - plr / L[i] * (T @ Q[i] - c * Q[i])
                R = q.T - q
                R = R / (ref_bound(R, gen, skew=True) + torch.finfo(R.dtype).smallest_normal)
                RQ, RRQ = R @ q, R @ R @ q
                a = 0.125
                if RRQ.trace() < 0:
                    a = min(float(-RQ.trace() / RRQ.trace()), 0.125)
                Q[i] = q + a * (RQ + 0.5 * a * RRQ)
            else:
                ell = T.diagonal().max() + c
                L[i] = max(beta * L[i] + (1 - beta) * ell, ell)
                Q[i] = Q[i] * (1 - plr / L[i] * (T.diagonal() - c))
    if torch.rand([], generator=gen) < 0.01:
        n = [q.abs().max() for q in Q]
        gm = (n[0] * n[1]).sqrt()
        Q[0], Q[1] = Q[0] * gm / n[0], Q[1] * gm / n[1]
    if first:
        u = ref_precond(Q, m if mom > 0 else G)
    rms = u.square().mean().sqrt()
    if rms > 2.0:
        u = u * 2.0 / rms
    W.sub_(lr * u.clamp(-10.0, 10.0))
    return Q, L


def _loss(W1, W2, X, Y, C):
    return ((W1 @ X - Y) ** 2).sum() + (torch.tanh(W2) * C).sum() + (W2**4).sum()


@pytest.mark.parametrize(
    ("geometry", "mom", "wd", "first", "whiten_m"),
    [
        ("EQ", 0.0, 0.0, True, False),
        ("EQ", 0.5, 0.1, True, False),
        ("EQ", 0.5, 0.0, False, True),
        ("Q0.5EQ1.5", 0.5, 0.1, True, False),
    ],
)
def test_matches_reference_loop(geometry, mom, wd, first, whiten_m):
    g = torch.Generator().manual_seed(3)
    W1 = torch.randn(4, 6, dtype=DT, generator=g)
    W2 = torch.randn(3, 8, dtype=DT, generator=g)
    X, Y = torch.randn(6, 5, dtype=DT, generator=g), torch.randn(4, 5, dtype=DT, generator=g)
    C = torch.randn(3, 8, dtype=DT, generator=g)
    p1, p2 = torch.nn.Parameter(W1.clone()), torch.nn.Parameter(W2.clone())
    # max_skew=2: W1 (4x6) two dense factors; W2 (3x8) dense rows, diagonal columns (64 > 2*24)
    opt = PSGDKron(
        [p1, p2],
        lr=0.01,
        momentum=mom,
        weight_decay=wd,
        max_skew=2.0,
        preconditioner_update_probability=1.0,
        geometry=geometry,
        seed=7,
        update_preconditioner_first=first,
        whiten_grad=not whiten_m,
    )
    refs, Qs, Ls, ms = [W1.clone(), W2.clone()], None, None, None
    for t in range(5):
        opt.zero_grad()
        _loss(p1, p2, X, Y, C).backward()
        opt.step()
        a, b = (x.clone().requires_grad_() for x in refs)
        grads = torch.autograd.grad(_loss(a, b, X, Y, C), [a, b])
        if Qs is None:  # automatic initial scale over the group
            s = (max(float(gr.abs().pow(4).mean()) for gr in grads) + 1e-36) ** (-1 / 8)
            Qs = [
                [s**0.5 * torch.eye(4, dtype=DT), s**0.5 * torch.eye(6, dtype=DT)],
                [s**0.5 * torch.eye(3, dtype=DT), s**0.5 * torch.ones(8, dtype=DT)],
            ]
            Ls = [[0.0, 0.0], [0.0, 0.0]]
            ms = [torch.zeros_like(x) for x in refs]
        for j in range(2):
            gen = torch.Generator().manual_seed(probe_seed(7, t, j))
            Qs[j], Ls[j] = ref_step(
                refs[j], grads[j], Qs[j], Ls[j], t, gen, geometry, mom=mom, wd=wd, m=ms[j],
                first=first, whiten_m=whiten_m,
            )  # fmt: skip
    for p, ref, Q in zip((p1, p2), refs, Qs):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-10, atol=1e-12)
        for i, qr in enumerate(Q):
            q = opt.state[p][f"Q_{i}"]
            torch.testing.assert_close(q, qr, rtol=1e-10, atol=1e-12)
        assert opt.state[p]["step"].item() == 5
    assert [opt.state[p2][f"Q_{i}"].dim() for i in range(2)] == [2, 1]
    # EQ keeps the dense factors upper triangular (the Lie group of the paper)
    if geometry == "EQ":
        for p in (p1, p2):
            q0 = opt.state[p]["Q_0"]
            assert torch.equal(q0, torch.triu(q0))


def test_kron_precondition_is_explicit_kronecker_product():
    g = torch.Generator().manual_seed(0)
    Q = [
        torch.triu(torch.randn(3, 3, dtype=DT, generator=g)),
        torch.rand(4, dtype=DT, generator=g),
        torch.triu(torch.randn(2, 2, dtype=DT, generator=g)),
    ]
    G = torch.randn(3, 4, 2, dtype=DT, generator=g)
    Qk = torch.kron(torch.kron(Q[0], torch.diag(Q[1])), Q[2])  # row-major vec
    expect = (Qk.T @ Qk @ G.reshape(-1)).reshape(3, 4, 2)
    torch.testing.assert_close(kron_precondition(Q, G), expect)
    torch.testing.assert_close(kron_precondition(Q, G, triangular=True), expect)
    # a dense factor with d² > numel / d is applied as two products instead of forming P
    Qs = [torch.triu(torch.randn(6, 6, dtype=DT, generator=g))]
    Qs.append(torch.rand(2, dtype=DT, generator=g))
    Gs = torch.randn(6, 2, dtype=DT, generator=g)
    Qk = torch.kron(Qs[0], torch.diag(Qs[1]))
    expect = (Qk.T @ Qk @ Gs.reshape(-1)).reshape(6, 2)
    for tri in (False, True):
        torch.testing.assert_close(kron_precondition(Qs, Gs, triangular=tri), expect)


@pytest.mark.parametrize("n", [200, 600])
def test_structured_products_equal_dense_products(n):
    # sizes above the 256 block exercise the recursive triangular / symmetric blocking
    from curvlab.optim.psgd_kron import _gram, _mode_apply, _triu_mm

    g = torch.Generator().manual_seed(0)
    U = torch.triu(torch.randn(n, n, dtype=DT, generator=g))
    X = torch.randn(n, 70, dtype=DT, generator=g)
    torch.testing.assert_close(_triu_mm(U, X, False), U @ X)
    torch.testing.assert_close(_triu_mm(U, X, True), U.T @ X)
    torch.testing.assert_close(_gram(X), X @ X.T)
    Y = torch.randn(5, n, dtype=DT, generator=g)
    for tr in (False, True):
        M = U.T if tr else U
        torch.testing.assert_close(_mode_apply(U, Y, 1, tr, True), Y @ M.T)
        torch.testing.assert_close(_mode_apply(U, X, 0, tr, True), M @ X)
    Q = [U, torch.rand(5, dtype=DT, generator=g)]
    G = torch.randn(n, 5, dtype=DT, generator=g)
    torch.testing.assert_close(kron_precondition(Q, G, triangular=True), kron_precondition(Q, G))


def test_norm_lower_bound_is_a_tight_lower_bound():
    g = torch.Generator().manual_seed(0)
    for n in (5, 40):
        X = torch.randn(n, 2 * n, dtype=DT, generator=g)
        A = X @ X.T
        exact = torch.linalg.matrix_norm(A, 2)
        est = norm_lower_bound_spd(A, g)
        assert est <= exact * (1 + 1e-12)
        assert est >= 0.9 * exact


# --------------------------------------------------------------------------------------------------
# the paper's property: the whitening fit converges to P = E[g gᵀ]^{-1/2}
# --------------------------------------------------------------------------------------------------


def _spd(n, cond, g):
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    return U @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ U.T


@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5"])
def test_whitening_fit_recovers_newton_on_a_kronecker_quadratic(geometry):
    # quadratic with Hessian H = H0 ⊗ H1 and parameter noise z ~ N(0, I): gradients g = H z, so
    # E[g gᵀ] = H² and the whitening solution is P = H⁻¹ (Newton). Stochastic fit (one sample per
    # step), then Polyak-averaged P over the last 500 steps; measured error 3–8 % over 4 seeds.
    g = torch.Generator().manual_seed(0)
    H0, H1 = _spd(4, 10.0, g), _spd(3, 5.0, g)
    Q = init_factors((4, 3), [True, True], 1.0, DT)
    L = [torch.zeros([], dtype=DT) for _ in Q]
    P = torch.zeros(12, 12, dtype=DT)
    for it in range(1500):
        G = H0 @ torch.randn(4, 3, dtype=DT, generator=g) @ H1
        update_precond_kron_whiten(
            Q, L, G, geometry=geometry, lr=0.1 if it < 1000 else 0.02, generator=g
        )
        if it >= 1000:
            P += torch.kron(Q[0].T @ Q[0], Q[1].T @ Q[1]) / 500
    Hinv = torch.linalg.inv(torch.kron(H0, H1))
    assert torch.linalg.norm(P - Hinv) / torch.linalg.norm(Hinv) < 0.15


def test_whitening_fit_diagonal_factor():
    # diagonal factor: g = s ⊙ z gives P = diag(1/s); measured max error 4–13 % over 4 seeds
    g = torch.Generator().manual_seed(0)
    s = torch.logspace(-0.5, 0.5, 7, dtype=DT)
    Q, L = [torch.ones(7, dtype=DT)], [torch.zeros([], dtype=DT)]
    P = torch.zeros(7, dtype=DT)
    for it in range(1500):
        update_precond_kron_whiten(
            Q,
            L,
            s * torch.randn(7, dtype=DT, generator=g),
            lr=0.1 if it < 1000 else 0.02,
            generator=g,
        )
        if it >= 1000:
            P += Q[0] ** 2 / 500
    assert ((P - 1 / s).abs() * s).max() < 0.25


# --------------------------------------------------------------------------------------------------
# factor rule (official init_kron)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "kw", "kinds"),
    [
        ((512, 1024), {}, [True, False]),  # one-sided: the larger side is diagonal
        ((1024, 512), {}, [False, True]),
        ((64, 64), {}, [True, True]),  # square: two-sided
        ((10,), {}, [False]),  # vectors diagonal unless max_skew >= d
        ((10,), {"max_skew": 10.0}, [True]),
        ((), {}, [False]),  # scalar
        ((1, 5, 1), {}, [False]),  # squeezed to (5,)
        ((3, 4, 5), {}, [True, True, True]),
        ((3, 4, 5), {"max_size": 4}, [True, True, False]),
        ((3, 4, 5), {"max_skew": 0.0}, [False, False, False]),
        ((100_000, 2), {"max_skew": math.inf, "max_size": 8192}, [False, True]),
    ],
)
def test_factor_kinds(shape, kw, kinds):
    assert factor_kinds(shape, **kw) == kinds


def test_optimizer_state_follows_the_factor_rule():
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 12), (12,), (1, 4), (), (2, 3, 4)]]
    opt = PSGDKron(ps, init_scale=1.0)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    shapes = [[tuple(v.shape) for k, v in opt.state[p].items() if k[:2] == "Q_"] for p in ps]
    assert shapes == [[(6, 6), (12,)], [(12,)], [(4,)], [()], [(2, 2), (3, 3), (4, 4)]]
    for p in ps:
        assert all(v.dtype == p.dtype for k, v in opt.state[p].items() if k[:2] == "Q_")
        assert torch.isfinite(p).all()


# --------------------------------------------------------------------------------------------------
# update probability
# --------------------------------------------------------------------------------------------------


def test_schedule_closed_form():
    assert precond_update_prob_schedule(0) == 1.0
    assert precond_update_prob_schedule(500) == 1.0
    assert precond_update_prob_schedule(1000) == pytest.approx(math.exp(-0.5))
    assert precond_update_prob_schedule(10_000) == 0.03


def test_default_schedule_anneals_to_the_authors_floor():
    # the author's scripts anneal the update probability to 0.01; kron-torch's schedule shape
    w = torch.nn.Parameter(torch.randn(3, 3, dtype=DT))
    group = PSGDKron([w]).param_groups[0]
    assert group["preconditioner_update_probability"] is None
    assert group["prob_min"] == 0.01
    # 5,000 steps on the floor: binomial mean 50, std 7.0; 4 std = 28 (0.03 would give 150)
    updates = sum(update_coin(group, t) for t in range(20_000, 25_000))
    assert 22 <= updates <= 78
    assert all(update_coin(group, t) for t in range(500))  # the flat start refits every step


def test_default_max_size_makes_large_dims_diagonal():
    # kron-torch's max_size_triangular = 8192: with max_skew = inf a vector of 8193 entries
    # would get a dense 8193 x 8193 factor (268 MB); by default it gets a diagonal one
    p = torch.nn.Parameter(torch.randn(8193))
    opt = PSGDKron([p], max_skew=math.inf, init_scale=1.0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["Q_0"].shape == (8193,)
    q = torch.nn.Parameter(torch.randn(64))
    opt = PSGDKron([q], max_skew=math.inf, init_scale=1.0)
    q.grad = torch.randn_like(q)
    opt.step()
    assert opt.state[q]["Q_0"].shape == (64, 64)


def test_update_coin_frequency():
    # p = 0.3 over 300 steps: binomial std sqrt(0.3*0.7/300) = 0.026; 4 std = 0.11
    w = torch.nn.Parameter(torch.randn(3, 3, dtype=DT))
    opt = PSGDKron([w], lr=1e-3, preconditioner_update_probability=0.3, init_scale=1.0)
    updates = 0
    for _ in range(300):
        w.grad = torch.randn(3, 3, dtype=DT)
        before = opt.state[w]["Q_0"].clone() if opt.state[w] else None
        opt.step()
        if before is not None and not torch.equal(before, opt.state[w]["Q_0"]):
            updates += 1
    assert abs(updates / 299 - 0.3) < 0.11


# --------------------------------------------------------------------------------------------------
# convergence
# --------------------------------------------------------------------------------------------------


def test_converges_on_ill_conditioned_quadratic():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(10, 10, dtype=DT, generator=g))
    H = U @ torch.diag(torch.logspace(0, 2, 10, dtype=DT)) @ U.T
    x = torch.nn.Parameter(torch.ones(10, dtype=DT))
    f0 = float(0.5 * x.detach() @ H @ x.detach())
    opt = PSGDKron([x], lr=0.01, max_skew=math.inf)
    for _ in range(500):
        opt.zero_grad()
        f = 0.5 * x @ H @ x
        f.backward()
        opt.step()
    assert f.item() < 1e-3 * f0


def test_converges_on_rosenbrock_with_lr_schedule():
    x = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=DT))
    opt = PSGDKron([x], lr=0.01, max_skew=math.inf)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < 700 else 0.1)
    for _ in range(1000):
        opt.zero_grad()
        f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        f.backward()
        opt.step()
        sched.step()
    assert f.item() < 1e-3
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=DT), atol=0.05, rtol=0)


# --------------------------------------------------------------------------------------------------
# state: bit-identical resume, deepcopy, dtype of L
# --------------------------------------------------------------------------------------------------


def _run(model, opt, steps, g):
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 5, generator=g)
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("prob", [None, 0.5])
def test_state_dict_round_trip_is_bit_identical(prob):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    kw = dict(
        lr=0.01,
        momentum=0.9,
        preconditioner_update_probability=prob,
        prob_flat_start=2,
        prob_decay=0.3,
        seed=11,
    )
    opt = PSGDKron(model.parameters(), **kw)
    _run(model, opt, 4, torch.Generator().manual_seed(1))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _run(model, opt, 6, torch.Generator().manual_seed(2))

    model2 = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model2.load_state_dict(saved_model)
    opt2 = PSGDKron(model2.parameters(), **kw)
    opt2.load_state_dict(saved_opt)
    _run(model2, opt2, 6, torch.Generator().manual_seed(2))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key])
    # only tensors in the state
    for st in opt.state_dict()["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in st.values())


def test_deepcopy_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = PSGDKron(model.parameters(), lr=0.01, preconditioner_update_probability=0.5)
    _run(torch.nn.Sequential(model), opt, 3, torch.Generator().manual_seed(1))
    model2, opt2 = copy.deepcopy((model, opt))
    _run(torch.nn.Sequential(model), opt, 3, torch.Generator().manual_seed(2))
    _run(torch.nn.Sequential(model2), opt2, 3, torch.Generator().manual_seed(2))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_lipschitz_estimate_keeps_float32_for_bfloat16_params():
    w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = PSGDKron([w], init_scale=1.0)
    w.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    opt2 = PSGDKron([w], init_scale=1.0)
    opt2.load_state_dict(opt.state_dict())
    for o in (opt, opt2):
        assert [o.state[w][f"L_{i}"].dtype for i in range(2)] == [torch.float32] * 2
        assert [o.state[w][f"Q_{i}"].dtype for i in range(2)] == [torch.bfloat16] * 2


def test_params_without_grad_are_skipped_and_lr_zero_freezes():
    a, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    opt = PSGDKron([a, b], lr=0.0)
    a.grad = torch.randn(3, 2)
    a0 = a.detach().clone()
    opt.step()
    assert len(opt.state[b]) == 0
    assert torch.equal(a, a0)


# --------------------------------------------------------------------------------------------------
# error inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lr": -1.0}, "lr must be a finite number >= 0"),
        ({"lr": float("nan")}, "lr must be a finite number >= 0"),
        ({"preconditioner_lr": 0.0}, r"preconditioner_lr must be a number in \(0.0, 1.0\)"),
        ({"preconditioner_lr": 1.5}, r"preconditioner_lr must be a number in \(0.0, 1.0\)"),
        ({"beta_lipschitz": 1.1}, r"beta_lipschitz must be a number in \[0.0, 1.0\]"),
        ({"damping": -1e-9}, "damping must be a finite number >= 0"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0.0, 1.0\)"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"on_nonfinite": "warn"}, "on_nonfinite must be one of 'raise'"),
        ({"grad_clip_max_amps": (2.0,)}, "grad_clip_max_amps must be two positive numbers"),
        ({"grad_clip_max_amps": (2.0, -1.0)}, "grad_clip_max_amps must be two positive numbers"),
        ({"preconditioner_update_probability": 0.0}, "preconditioner_update_probability must be"),
        ({"prob_min": 2.0}, "prob_min must be a number in"),
        ({"max_skew": -1.0}, "max_skew must be a number in"),
        ({"init_scale": 0.0}, "init_scale must be a number in"),
        ({"geometry": "QUAD"}, "geometry must be one of 'EQ', 'Q0.5EQ1.5'"),
        (
            {"whiten_grad": False},
            "whiten_grad=False whitens the momentum, which needs momentum > 0",
        ),
        ({"seed": 1.5}, "seed must be an int"),
    ],
)
def test_error_inputs(kw, match):
    with pytest.raises(ParameterError, match=match):
        PSGDKron([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_error_in_added_param_group():
    opt = PSGDKron([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ParameterError, match="momentum must be a number in"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": 2.0})


def test_sparse_gradient_rejected():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    w.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(ParameterError, match="sparse gradient"):
        PSGDKron([w]).step()


def test_load_state_dict_errors():
    a = torch.nn.Parameter(torch.randn(3, 2))
    opt = PSGDKron([a], init_scale=1.0)
    a.grad = torch.randn(3, 2)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(StateDictError, match=r"expects the dict returned by optimizer\.state_dict"):
        opt.load_state_dict({"state": {}})
    other = PSGDKron([torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(StateDictError, match="parameters but this PSGDKron has 2"):
        other.load_state_dict(sd)
    wrong = PSGDKron([torch.nn.Parameter(torch.randn(5, 2))])
    with pytest.raises(StateDictError, match="does not fit the parameter's shape"):
        wrong.load_state_dict(sd)
    adam_sd = torch.optim.Adam([a]).state_dict()
    with pytest.raises(StateDictError, match="lacks the PSGDKron hyper-parameters"):
        opt.load_state_dict(adam_sd)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = torch.zeros(3, 2)
    with pytest.raises(StateDictError, match="saved from another optimizer"):
        opt.load_state_dict(bad)


# --------------------------------------------------------------------------------------------------
# the Newton-type fit on (v, Hv) pairs: fit="hvp" / "finite_difference" (official KronNewton)
# --------------------------------------------------------------------------------------------------


def ref_newton_step(W, H, C, Q, L, t, fit, geometry, lr=0.5, plr=0.1, beta=0.9, damp=1e-9):
    """One KronNewton step (prob 1, no momentum, no clip) on f(W) = ½ vec(W)ᵀH vec(W) + <C, W>."""
    from curvlab.optim._psgd import mix_seed, pair_probe_seed

    grad = lambda X: (H @ X.reshape(-1)).reshape(X.shape) + C  # noqa: E731
    G = grad(W)
    v = torch.randn(
        W.shape, dtype=DT, generator=torch.Generator().manual_seed(pair_probe_seed(0, t, 0))
    )
    if fit == "hvp":
        hv = (H @ v.reshape(-1)).reshape(W.shape)
    else:
        delta = torch.finfo(DT).eps ** 0.5
        W2 = W + delta * v
        hv = (grad(W2) - G) / delta
    gen = torch.Generator().manual_seed(mix_seed(0, t, 1))
    if t == 0:  # official on-the-fly scale: (mean v²)^(1/4) (mean h⁴ + damping⁴)^(-1/8)
        s = (v.square().mean() ** 0.25 * (hv.abs().pow(4).mean() + damp**4) ** -0.125) ** 0.5
        Q = [s * torch.eye(W.shape[0], dtype=DT), s * torch.eye(W.shape[1], dtype=DT)]
        L = [0.0, 0.0]
    h = hv + (damp + torch.finfo(DT).eps * hv.abs()) * torch.randn(W.shape, dtype=DT, generator=gen)
    if geometry == "EQ":
        A = Q[0] @ h @ Q[1].T
        B = torch.linalg.inv(Q[0]).T @ v @ torch.linalg.inv(Q[1])
        grams = [(A @ A.T, B @ B.T), (A.T @ A, B.T @ B)]
        for i in range(2):
            T1, T2 = grams[i]
            ell = ref_bound(T1 + T2, gen)
            L[i] = max(beta * L[i] + (1 - beta) * ell, ell)
            Q[i] = Q[i] - (plr / L[i] * torch.triu(T1 - T2)) @ Q[i]
    else:  # dQ = Q^0.5 E Q^1.5 with the pair: T_i = Ph Phᵀ - v vᵀ (mode-wise)
        Ph = Q[0].T @ Q[0] @ h @ Q[1].T @ Q[1]
        for i, (T1, T2) in enumerate(((Ph @ Ph.T, v @ v.T), (Ph.T @ Ph, v.T @ v))):
            ell = ref_bound(T1 + T2, gen)
            L[i] = max(beta * L[i] + (1 - beta) * ell, ell)
            q = Q[i] - plr / L[i] * (T1 - T2) @ Q[i]
            R = q.T - q
            R = R / (ref_bound(R, gen, skew=True) + torch.finfo(R.dtype).smallest_normal)
            RQ, RRQ = R @ q, R @ R @ q
            a = 0.125
            if RRQ.trace() < 0:
                a = min(float(-RQ.trace() / RRQ.trace()), 0.125)
            Q[i] = q + a * (RQ + 0.5 * a * RRQ)
    if torch.rand([], generator=gen) < 0.01:
        n = [q.abs().max() for q in Q]
        gm = (n[0] * n[1]).sqrt()
        Q[0], Q[1] = Q[0] * gm / n[0], Q[1] * gm / n[1]
    return W - lr * (Q[0].T @ Q[0] @ G @ Q[1].T @ Q[1]), Q, L


def _dense_quadratic(n, cond, seed):
    g = torch.Generator().manual_seed(seed)
    R, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    return R @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ R.T


@pytest.mark.parametrize("fit", ["hvp", "finite_difference"])
@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5"])
def test_newton_fit_matches_reference_loop(fit, geometry):
    H = _dense_quadratic(12, 1e3, 1)
    C = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    W0 = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    W = torch.nn.Parameter(W0.clone())
    opt = PSGDKron(
        [W], lr=0.5, fit=fit, geometry=geometry, max_skew=math.inf,
        preconditioner_update_probability=1.0, grad_clip_max_amps=(math.inf, math.inf),
    )  # fmt: skip
    closure = lambda: 0.5 * W.reshape(-1) @ H @ W.reshape(-1) + (C * W).sum()  # noqa: E731
    # a finite difference divides round-off of the gradients (autograd here, H @ x there) by
    # δ = √ε: the two agree to ~√ε, not to ε
    tol = {"rtol": 1e-9, "atol": 1e-11} if fit == "hvp" else {"rtol": 1e-5, "atol": 1e-7}
    Wr, Q, L = W0.clone(), None, None
    for t in range(25):
        loss = opt.step(closure)
        assert loss.grad_fn is None
        Wr, Q, L = ref_newton_step(Wr, H, C, Q, L, t, fit, geometry)
        torch.testing.assert_close(W.detach(), Wr, **tol)
    torch.testing.assert_close(opt.state[W]["Q_0"], Q[0], **tol)


def test_newton_fit_converges_to_inverse_hessian():
    """On a quadratic the pair fit's fixed point is P = H⁻¹: after 1500 fits (κ = 10) every
    eigenvalue of PH is near 1. (With the official step normalised by ‖AAᵀ + BBᵀ‖ the
    low-curvature directions approach it at a rate ~ preconditioner_lr/κ per fit.)"""
    H = _dense_quadratic(8, 10.0, 5)
    x = torch.nn.Parameter(torch.ones(8, dtype=DT))
    opt = PSGDKron(
        [x], lr=0.0, fit="hvp", max_skew=math.inf, preconditioner_lr=0.3,
        preconditioner_update_probability=1.0,
    )  # fmt: skip
    for _ in range(1500):
        opt.step(lambda: 0.5 * x @ H @ x)
    Q = opt.state[x]["Q_0"]
    eig = torch.linalg.eigvals(Q.T @ Q @ H).real
    assert eig.min() > 0.7 and eig.max() < 1.4, eig


def test_newton_fit_error_inputs():
    from curvlab.errors import ClosureRequiredError

    w = torch.nn.Parameter(torch.ones(3))
    opt = PSGDKron([w], fit="hvp")
    with pytest.raises(
        ClosureRequiredError, match=r"WITHOUT calling backward\(\).*\n.*def closure"
    ):
        opt.step()
    assert opt.closure_mode == "loss" and PSGDKron([w]).closure_mode == "backward"

    def backward_closure():
        loss = (w**2).sum()
        loss.backward()
        return loss

    with pytest.raises(ClosureRequiredError, match="called backward"):
        opt.step(backward_closure)
    with pytest.raises(
        ParameterError, match="fit must be one of 'whiten', 'hvp', 'finite_difference'"
    ):
        PSGDKron([w], fit="newton")
    with pytest.raises(ParameterError, match="fit is optimizer-wide"):
        PSGDKron([{"params": [w], "fit": "whiten"}], fit="hvp")


@pytest.mark.parametrize("device_type", ["cpu"])
def test_steps_inside_autocast_equal_steps_outside(device_type):
    # inside torch.autocast(bfloat16) the preconditioner's matmuls would come out in bfloat16
    # (torch raised "Expected out tensor to have dtype c10::BFloat16"); the update is the same
    torch.manual_seed(0)
    models = [torch.nn.Linear(6, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [PSGDKron(m.parameters(), lr=0.01, seed=0) for m in models]
    x = torch.randn(16, 6)
    for _ in range(3):
        for i, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            m(x).square().mean().backward()
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=i == 1):
                opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
