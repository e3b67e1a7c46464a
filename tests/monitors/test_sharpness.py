"""Sharpness: exact λ_max on dense float64 Hessians, thresholds, warm start, Adam preconditioning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.monitors import (
    HistorySink,
    Sharpness,
    adam_preconditioner,
    attach,
    stability_threshold,
)


def _problem(gen, n=40):
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return model, X, y


def _dense_hessian(model, loss_fn, X, y):
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(v):
        chunks, off = {}, 0
        for name, p in zip(names, params):
            chunks[name] = v[off : off + p.numel()].view_as(p)
            off += p.numel()
        return loss_fn(torch.func.functional_call(model, chunks, (X,)), y)

    return torch.func.hessian(f)(flat)


def test_value_matches_dense_hessian_and_thresholds(gen):
    model, X, y = _problem(gen)
    mse = nn.MSELoss()
    for kwargs, expected in [
        ({"lr": 0.1}, 20.0),
        ({"lr": 0.1, "momentum": 0.9}, 38.0),
        ({"lr": 0.1, "momentum": 0.5, "nesterov": True}, 3.0 / (2.0 * 0.1)),
    ]:
        opt = torch.optim.SGD(model.parameters(), **kwargs)
        handle = attach(opt, Sharpness(model, mse, (X, y), tol=1e-8), HistorySink())
        values = handle.check_now()
        handle.remove()
        top = float(torch.linalg.eigvalsh(_dense_hessian(model, mse, X, y))[-1])
        assert values["sharpness/value"] == pytest.approx(top, rel=1e-8)
        assert values["sharpness/threshold"] == pytest.approx(expected)
        assert values["sharpness/ratio"] == pytest.approx(top / expected)


@pytest.mark.parametrize("make", [torch.optim.SGD, torch.optim.Adam])
def test_a_zero_learning_rate_is_stable_at_any_curvature(gen, make):
    # the end of a cosine schedule: 2/eta -> inf and lambda*eta/2 -> 0 (the check used to fail)
    model, X, y = _problem(gen)
    opt = make(model.parameters(), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam's second moment exists, so the preconditioned figures are computed too
    handle = attach(opt, Sharpness(model, nn.MSELoss(), (X, y), tol=1e-8), HistorySink())
    values = handle.check_now()
    handle.remove()
    assert values["sharpness/value"] > 0 and values["sharpness/threshold"] == math.inf
    assert values["sharpness/ratio"] == 0.0
    if make is torch.optim.Adam:
        assert values["sharpness/preconditioned_ratio"] == 0.0


def test_which_la_not_magnitude(gen):
    # a loss whose Hessian has a large negative eigenvalue: sharpness must be the largest algebraic
    class Saddle(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.0, 0.0], dtype=torch.float64))

        def forward(self, x):
            return x

    model = Saddle()

    def loss_fn(out, _y):
        w = model.w
        return 0.5 * (1.0 * w[0] ** 2 - 10.0 * w[1] ** 2) + 0 * out.sum()

    X = torch.zeros(2, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    values = attach(opt, Sharpness(model, loss_fn, (X, X), tol=1e-10)).check_now()
    assert values["sharpness/value"] == pytest.approx(1.0, rel=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_warm_start_reuses_last_eigenvector(seed):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 2)
    )
    with torch.no_grad():  # deterministic init, independent of the global RNG and test order
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    X = torch.randn(64, 3, generator=gen)
    y = torch.randn(64, 2, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Sharpness(model, nn.MSELoss(), (X, y), every=1)
    handle = attach(opt, mon, HistorySink())
    for _ in range(6):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    mv = handle.sink.values("sharpness/matvecs")
    assert len(mv) == 6
    # the first solve starts from a random vector; later ones from the previous eigenvector
    assert max(mv[1:]) < mv[0] / 2
    cold = Sharpness(model, nn.MSELoss(), (X, y), name="cold")
    cold_values = attach(opt, cold).check_now()
    assert cold_values["cold/matvecs"] > 2 * max(mv[1:])
    assert cold_values["cold/value"] == pytest.approx(handle.sink.last("sharpness/value"), rel=1e-3)


def test_adam_preconditioned_sharpness(gen):
    model, X, y = _problem(gen)
    mse = nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    mon = Sharpness(model, mse, (X, y), every=1, tol=1e-9)
    handle = attach(opt, mon, HistorySink())
    before = handle.check_now()
    assert math.isnan(before["sharpness/preconditioned"])  # no Adam state before step 1
    for _ in range(3):
        opt.zero_grad()
        mse(model(X), y).backward()
        opt.step()
    # reference: P from the Adam state by hand, eigenvalues of P^-1 H (non-symmetric) via numpy
    params = list(model.parameters())
    t = 3
    p = torch.cat(
        [
            ((1 - 0.9**t) * ((opt.state[q]["exp_avg_sq"] / (1 - 0.999**t)).sqrt() + 1e-8)).reshape(
                -1
            )
            for q in params
        ]
    )
    pre, beta1, lr = adam_preconditioner(opt, params)
    assert torch.allclose(pre, p) and beta1 == 0.9 and lr == 0.01
    H = _dense_hessian(model, mse, X, y)
    top = max(torch.linalg.eigvals(torch.diag(1 / p) @ H).real.tolist())
    assert handle.sink.last("sharpness/preconditioned") == pytest.approx(top, rel=1e-6)
    assert handle.sink.last("sharpness/preconditioned_threshold") == pytest.approx(3800.0)
    assert handle.sink.last("sharpness/threshold") == pytest.approx(200.0)


def test_trace_against_dense(gen):
    model, X, y = _problem(gen)
    mse = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n = sum(p.numel() for p in model.parameters())
    # Hutch++ with num_matvecs >= 3n is exact up to rounding (the sketch spans the space)
    mon = Sharpness(model, mse, (X, y), trace=True, trace_matvecs=3 * n)
    values = attach(opt, mon).check_now()
    exact = float(torch.trace(_dense_hessian(model, mse, X, y)))
    assert values["sharpness/trace"] == pytest.approx(exact, rel=1e-6)
    assert values["sharpness/trace_ratio"] == pytest.approx(exact * 0.1 / 2, rel=1e-6)


def test_stability_threshold_rules_and_errors(gen):
    assert stability_threshold(0.5) == 4.0
    assert stability_threshold(0.1, momentum=0.9, dampening=0.5) == pytest.approx(76.0)
    assert stability_threshold(0.001, adam_beta1=0.9) == pytest.approx(38000.0)
    with pytest.raises(ValueError, match="positive"):
        stability_threshold(0.0)
    model, X, y = _problem(gen)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Adam-type"):
        attach(sgd, Sharpness(model, nn.MSELoss(), (X, y), preconditioned=True))
    with pytest.raises(ValueError, match="k must be"):
        Sharpness(model, nn.MSELoss(), (X, y), k=0)


def test_failure_during_training_is_isolated(gen):
    model, X, y = _problem(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Sharpness(model, nn.MSELoss(), (X, y), every=1, max_matvecs=5)
    handle = attach(opt, mon, HistorySink())
    mon.counter = None  # simulate a broken monitor state
    with pytest.warns(UserWarning, match="failed at step 1"):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    assert handle.failures and handle.sink.steps("sharpness/failed") == [1]
