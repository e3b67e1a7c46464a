"""SubspaceOverlap, gradient overlap, persistence and the Dom/Bulk projection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.errors import ShapeMismatchError
from curvlab.monitors import (
    HistorySink,
    SubspaceOverlap,
    attach,
    gradient_overlap,
    project_gradient_,
    subspace_persistence,
)


def test_overlap_and_persistence_exact(gen):
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    g = 2.0 * q[:, 0] + 1.0 * q[:, 3]
    assert gradient_overlap(g, q[:, :2]) == pytest.approx(4.0 / 5.0)
    assert gradient_overlap(g, q[:, 1:3]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(gradient_overlap(torch.zeros(6, dtype=torch.float64), q[:, :2]))
    assert subspace_persistence(q[:, :3], q[:, :3]) == pytest.approx(1.0)
    assert subspace_persistence(q[:, :3], q[:, 3:]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ShapeMismatchError, match="same shape"):
        subspace_persistence(q[:, :3], q[:, :2])


def test_projection_dom_plus_bulk_is_identity(gen):
    model = nn.Linear(3, 2).double()
    params = list(model.parameters())
    g = torch.randn(8, generator=gen, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64))

    def set_grad():
        params[0].grad = g[:6].view(2, 3).clone()
        params[1].grad = g[6:].clone()

    set_grad()
    project_gradient_(params, basis, keep="dom")
    dom = torch.cat([p.grad.reshape(-1) for p in params])
    set_grad()
    project_gradient_(params, basis, keep="bulk")
    bulk = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(dom + bulk, g)
    assert torch.allclose(basis.T @ bulk, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(dom, basis @ (basis.T @ g))
    with pytest.raises(ValueError, match="'dom'"):
        project_gradient_(params, basis, keep="top")
    with pytest.raises(ShapeMismatchError, match="8 entries"):
        project_gradient_(params, basis[:5], keep="dom")


def test_monitor_matches_dense_computation(gen):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    ce = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = SubspaceOverlap(model, ce, (X, y), every=2, tol=1e-10)
    handle = attach(opt, mon, HistorySink())
    assert mon.k == 3  # classes, from the model's output width
    for _ in range(4):
        opt.zero_grad()
        ce(model(X), y).backward()
        opt.step()
    H = mon.operator.to_dense()
    evals, evecs = torch.linalg.eigh(H)
    top = evecs[:, -3:]
    _, grad = mon.operator.loss_and_gradient()
    assert handle.sink.last("subspace/grad_overlap") == pytest.approx(
        gradient_overlap(grad, top), rel=1e-6
    )
    assert handle.sink.last("subspace/top_eigenvalue") == pytest.approx(float(evals[-1]), rel=1e-8)
    n = H.shape[0]
    assert handle.sink.last("subspace/random_overlap") == pytest.approx(3 / n)
    assert 0.0 <= handle.sink.last("subspace/persistence") <= 1.0 + 1e-9
    assert math.isnan(handle.sink.values("subspace/persistence")[0])
    with pytest.raises(ValueError, match="smaller than n"):
        attach(opt, SubspaceOverlap(model, ce, (X, y), k=n, name="big"))
