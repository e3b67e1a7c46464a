"""PSGDLRA: reference loop with dense matrices from the authors' pseudo-code, whitening fixed point,
resume, error inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from curvlab.errors import ParameterError, StateDictError
from curvlab.optim._psgd import mix_seed as _mix_seed
from curvlab.optim.psgd_lra import PSGDLRA, update_precond_lra_whiten
from tests.optim import _psgd_reference as ref

DT = torch.float64


def ref_lra_fit(U, V, d, L, v, h, gen, lr=0.1, beta=0.9):
    """Li's LRA fit, with Q = (I + U Vᵀ) diag(d) formed densely and dense solves."""
    n = U.shape[0]
    UtU, VtV = U.T @ U, V.T @ V
    rho = (UtU.trace() / VtV.trace()) ** 0.25
    E = 0.1 * (UtU / rho**2 - VtV * rho**2) / (UtU.trace() / rho**2 + VtV.trace() * rho**2)
    U, V = U / rho, V * rho
    U, V = U - U @ (E - 0.5 * E @ E), V + V @ (E + 0.5 * E @ E)
    Q = (torch.eye(n, dtype=DT) + U @ V.T) @ torch.diag(d[:, 0])
    a = Q @ h
    Ph = Q.T @ a
    b = torch.linalg.solve(Q.T, v)
    inv_pv = torch.linalg.solve(Q, b)
    ell = (Ph * h).abs().max() + (v * inv_pv).abs().max()
    L[2] = max(beta * L[2] + (1 - beta) * ell, ell)
    d = d - lr / L[2] * (Ph * h - v * inv_pv) * d
    IpVtU = torch.eye(U.shape[1], dtype=DT) + V.T @ U
    if torch.rand([], generator=gen) < 0.5:
        atV, btV = a.T @ V, b.T @ V
        ell = a.norm() * (atV @ V.T).norm() + b.norm() * (btV @ V.T).norm()
        L[0] = max(beta * L[0] + (1 - beta) * ell, ell)
        U = U - lr / L[0] * (a @ atV @ IpVtU - b @ btV @ IpVtU)
    else:
        atU, btU = a.T @ U, b.T @ U
        ell = a.norm() * (U @ atU.T).norm() + b.norm() * (U @ btU.T).norm()
        L[1] = max(beta * L[1] + (1 - beta) * ell, ell)
        V = V - lr / L[1] * ((a + V @ atU.T) @ atU - (b + V @ btU.T) @ btU)
    return U, V, d, L


@pytest.mark.parametrize("mom", [0.0, 0.5])
def test_matches_reference_loop(mom):
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 4, dtype=DT, generator=g)
    c = torch.randn(5, dtype=DT, generator=g)
    W0, b0 = torch.randn(3, 4, dtype=DT, generator=g), torch.randn(5, dtype=DT, generator=g)

    def loss(W, b):
        return ((W - A) ** 4).sum() + (W.sum() + b @ c) ** 2 + (b**2).sum()

    p1, p2 = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
    r = 2
    opt = PSGDLRA([p1, p2], lr=0.01, rank=r, momentum=mom, seed=5,
                  preconditioner_update_probability=1.0)  # fmt: skip
    x = torch.cat([W0.reshape(-1), b0]).reshape(-1, 1)
    init = torch.Generator().manual_seed(_mix_seed(5, -1, 0))
    U = torch.randn(17, r, dtype=DT, generator=init)
    U = U * 0.1**0.5 / U.norm()
    V = torch.randn(17, r, dtype=DT, generator=init)
    V = V * 0.1**0.5 / V.norm()
    d, L, m = None, [0.0, 0.0, 0.0], torch.zeros(17, 1, dtype=DT)
    for t in range(6):
        gr, scale = ref.whitening_step(opt, loss, (p1, p2), x)
        if d is None:
            d = torch.full((17, 1), scale, dtype=DT)
        bt = min(t / (t + 1), mom)
        m = bt * m + (1 - bt) * gr
        gen = torch.Generator().manual_seed(_mix_seed(5, t, 1))
        v = torch.randn(17, 1, dtype=DT, generator=gen)
        h = gr + (1e-9 + torch.finfo(DT).eps * gr.abs()) * v
        U, V, d, L = ref_lra_fit(U, V, d, L, v, h, gen)
        Q = (torch.eye(17, dtype=DT) + U @ V.T) @ torch.diag(d[:, 0])
        u = Q.T @ Q @ (m if mom > 0 else gr)
        rms = u.square().mean().sqrt()
        u = (u * 2.0 / rms if rms > 2.0 else u).clamp(-10.0, 10.0)
        x = x - 0.01 * u
    torch.testing.assert_close(torch.cat([p1.detach().reshape(-1), p2.detach()]), x[:, 0],
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    Um = torch.cat([opt.state[p]["U"] for p in (p1, p2)])
    dm = torch.cat([opt.state[p]["d"] for p in (p1, p2)])
    torch.testing.assert_close(Um, U, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dm, d[:, 0], rtol=1e-10, atol=1e-12)


def test_whitening_fit_recovers_inverse_sqrt_of_diagonal_plus_rank_one():
    # g ~ N(0, Σ), Σ = D + 2 w wᵀ: the rank-1 LRA family contains a good fit of Σ^{-1/2}; averaged P
    # over the last 700 steps; measured errors 5–12 % over 3 seeds.
    g = torch.Generator().manual_seed(0)
    n = 6
    w = torch.randn(n, 1, dtype=DT, generator=g)
    S = torch.diag(torch.logspace(-0.3, 0.3, n, dtype=DT)) + 2 * w @ w.T
    C = torch.linalg.cholesky(S)
    ev, Ev = torch.linalg.eigh(S)
    target = Ev @ torch.diag(ev**-0.5) @ Ev.T
    U = torch.randn(n, 1, dtype=DT, generator=g)
    U *= 0.1**0.5 / U.norm()
    V = torch.randn(n, 1, dtype=DT, generator=g)
    V *= 0.1**0.5 / V.norm()
    d, L = torch.ones(n, 1, dtype=DT), [torch.zeros([], dtype=DT) for _ in range(3)]
    P = torch.zeros(n, n, dtype=DT)
    for it in range(2200):
        x = C @ torch.randn(n, 1, dtype=DT, generator=g)
        update_precond_lra_whiten(U, V, d, L, x, lr=0.1 if it < 1500 else 0.02, generator=g)
        if it >= 1500:
            Q = (torch.eye(n, dtype=DT) + U @ V.T) @ torch.diag(d[:, 0])
            P += Q.T @ Q / 700
    assert torch.linalg.norm(P - target) / torch.linalg.norm(target) < 0.2


def test_state_dict_round_trip_is_bit_identical():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    kw = dict(lr=0.01, rank=3, momentum=0.9, preconditioner_update_probability=0.5)
    opt = PSGDLRA(model.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)

    def run(mdl, o, n, g):
        for _ in range(n):
            o.zero_grad()
            mdl(torch.randn(16, 5, generator=g)).square().mean().backward()
            o.step()

    run(model, opt, 3, gen)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, 4, torch.Generator().manual_seed(2))
    model2 = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model2.load_state_dict(saved[0])
    opt2 = PSGDLRA(model2.parameters(), **kw)
    opt2.load_state_dict(saved[1])
    run(model2, opt2, 4, torch.Generator().manual_seed(2))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k])


def test_param_without_grad_is_left_out():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2))
    opt = PSGDLRA([a, b], rank=2)
    b0 = b.detach().clone()
    a.grad = torch.randn(4, 3)
    opt.step()
    assert len(opt.state[b]) == 0 and torch.equal(b, b0)
    assert tuple(opt.state[a]["U"].shape) == (12, 2)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lr": -1.0}, "lr must be a finite number >= 0"),
        ({"rank": -1}, "rank must be an int >= 0"),
        ({"rank": 2.5}, "rank must be an int >= 0"),
        ({"rank": 4}, r"rank must be smaller than the number of entries of the param group \(4\)"),
        ({"preconditioner_lr": 1.0}, "preconditioner_lr must be a number in"),
        ({"momentum": -0.1}, "momentum must be a number in"),
        ({"whiten_grad": False}, "whiten_grad=False whitens the momentum"),
        ({"grad_clip_max_amps": 2.0}, "grad_clip_max_amps must be two positive numbers"),
    ],
)
def test_error_inputs(kw, match):
    with pytest.raises(ParameterError, match=match):
        PSGDLRA([torch.nn.Parameter(torch.zeros(2, 2))], **kw)


def test_load_state_dict_errors():
    a = torch.nn.Parameter(torch.randn(4, 3))
    opt = PSGDLRA([a], rank=2)
    a.grad = torch.randn(4, 3)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(StateDictError, match="expected"):
        PSGDLRA([torch.nn.Parameter(torch.randn(5, 3))], rank=2).load_state_dict(sd)
    with pytest.raises(StateDictError, match="lacks the PSGDLRA hyper-parameters"):
        opt.load_state_dict(torch.optim.SGD([a], lr=0.1).state_dict())


@pytest.mark.parametrize("mom", [0.0, 0.9])
def test_apply_only_steps_equal_the_flat_rule(mom):
    # steps that do not refit apply P block by block; they must equal precond_grad_lra on the
    # concatenated vectors (with the group-wide clip)
    from curvlab.optim.psgd_lra import precond_grad_lra

    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, dtype=DT, generator=g)) for s in [(4, 3), (5,), (2,)]]
    opt = PSGDLRA(ps, lr=0.5, rank=3, momentum=mom, preconditioner_update_probability=1.0)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, dtype=DT, generator=g)
        opt.step()
    opt.param_groups[0]["preconditioner_update_probability"] = 1e-300
    grads = [torch.randn(p.shape, dtype=DT, generator=g) for p in ps]
    before = [p.detach().clone() for p in ps]
    U = torch.cat([opt.state[p]["U"] for p in ps])
    V = torch.cat([opt.state[p]["V"] for p in ps])
    d = torch.cat([opt.state[p]["d"] for p in ps]).reshape(-1, 1)
    m = torch.cat([x.reshape(-1, 1) for x in grads])
    if mom > 0:
        old = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1, 1) for p in ps])
        beta = min(3 / 4, mom)  # t = 3 completed steps
        m = beta * old + (1 - beta) * m
    u = precond_grad_lra(U, V, d, m)
    u = u * min(1.0, 2.0 / float(u.square().mean().sqrt()))
    expect = torch.cat([b.reshape(-1, 1) for b in before]) - 0.5 * u.clamp(-10, 10)
    for p, x in zip(ps, grads):
        p.grad = x
    opt.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1, 1) for p in ps]), expect)
    assert torch.equal(opt.state[ps[0]]["U"], U[:12])  # nothing refitted


def test_state_views_or_copies_give_identical_steps():
    # U, V, d are kept as views of one buffer per group (the refit runs on it in place); when
    # the views are broken (clones, as after a casting load_state_dict) the step concatenates and
    # re-points them: both paths must give bit-identical results.
    g = torch.Generator().manual_seed(0)
    ps1 = [torch.nn.Parameter(torch.randn(s, dtype=DT, generator=g)) for s in [(4, 3), (5,)]]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    o1 = PSGDLRA(ps1, lr=0.1, rank=2, preconditioner_update_probability=1.0)
    o2 = PSGDLRA(ps2, lr=0.1, rank=2, preconditioner_update_probability=1.0)
    grads = [[torch.randn(p.shape, dtype=DT, generator=g) for p in ps1] for _ in range(4)]
    for k, gs in enumerate(grads):
        for o, ps in ((o1, ps1), (o2, ps2)):
            for p, x in zip(ps, gs):
                p.grad = x.clone()
            o.step()
        if k == 1:
            for p in ps2:
                for key in ("U", "V", "d"):
                    o2.state[p][key] = o2.state[p][key].clone()
    for a, b in zip(ps1, ps2):
        assert torch.equal(a, b)
        for key in ("U", "V", "d"):
            assert torch.equal(o1.state[a][key], o2.state[b][key])
    u0, u1 = (o2.state[p]["U"] for p in ps2)  # re-pointed: consecutive views again
    assert u1.untyped_storage().data_ptr() == u0.untyped_storage().data_ptr()


@pytest.mark.parametrize("fit", ["hvp", "finite_difference"])
def test_newton_fit_matches_reference_loop(fit):
    """Official LRANewton (prob 1, no momentum, no clip) on a non-quadratic loss over two
    parameters: v ~ N(0, I) per parameter, h = Hv (double backward) or (g(θ+δv) - g(θ))/δ, the
    damping noise, the on-the-fly scale of d, the fit on (v, h) first, then θ ← θ - lr P g."""
    loss, W0, b0 = ref.problem()
    p1, p2 = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
    r, inf = 2, float("inf")
    opt = PSGDLRA([p1, p2], lr=0.3, rank=r, seed=5, fit=fit, grad_clip_max_amps=(inf, inf),
                  preconditioner_update_probability=1.0)  # fmt: skip
    init = torch.Generator().manual_seed(_mix_seed(5, -1, 0))
    U = torch.randn(17, r, dtype=DT, generator=init)
    U = U * 0.1**0.5 / U.norm()
    V = torch.randn(17, r, dtype=DT, generator=init)
    V = V * 0.1**0.5 / V.norm()
    x = torch.cat([W0.reshape(-1), b0])
    d, L = None, [0.0, 0.0, 0.0]
    f = ref.flat_loss(loss)
    tol = {"rtol": 1e-9, "atol": 1e-11} if fit == "hvp" else {"rtol": 1e-5, "atol": 1e-7}
    for t in range(20):
        opt.step(lambda: loss(p1, p2))
        grad, v, hv = ref.newton_pair(f, x, t, fit, seed=5)
        gen = torch.Generator().manual_seed(_mix_seed(5, t, 1))
        if d is None:
            d = torch.full((17, 1), ref.pair_scale(v, hv), dtype=DT)
        h = ref.damped(hv, gen)
        U, V, d, L = ref_lra_fit(U, V, d, L, v[:, None], h[:, None], gen)
        Q = (torch.eye(17, dtype=DT) + U @ V.T) @ torch.diag(d[:, 0])
        x = x - 0.3 * Q.T @ Q @ grad
        torch.testing.assert_close(torch.cat([p1.detach().reshape(-1), p2.detach()]), x, **tol)


def test_newton_fit_needs_a_loss_closure():
    from curvlab.errors import ClosureRequiredError

    w = torch.nn.Parameter(torch.ones(4))
    opt = PSGDLRA([w], rank=1, fit="finite_difference")
    with pytest.raises(ClosureRequiredError, match=r"PSGDLRA\.step\(\) needs a closure"):
        opt.step()
    with pytest.raises(ParameterError, match="fit must be one of"):
        PSGDLRA([w], rank=1, fit="fd")
