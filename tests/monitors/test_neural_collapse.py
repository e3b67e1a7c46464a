"""NC1–NC4: exact collapsed configurations, a float64 loop reference, the monitor's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.errors import EmptyDataError, ParameterError, ShapeMismatchError
from curvlab.monitors import HistorySink, NeuralCollapse, attach, neural_collapse_metrics


def _etf(c: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """A simplex ETF of c unit vectors in R^d (rows), randomly rotated."""
    q, _ = torch.linalg.qr(torch.randn(d, c, generator=gen, dtype=torch.float64))
    m = torch.eye(c, dtype=torch.float64) - 1.0 / c
    m = m / m.norm(dim=1, keepdim=True)
    return m @ q.T  # [c, d]


def test_perfect_collapse_scores_zero_and_nc4_one(gen):
    c, d, per = 5, 8, 6
    means = 3.0 * _etf(c, d, gen)
    h = means.repeat_interleave(per, dim=0)
    y = torch.arange(c).repeat_interleave(per)
    w = 0.5 * means  # self-dual classifier
    m = neural_collapse_metrics(h, y, w, bias=torch.zeros(c))
    for name in ("nc1", "nc1_trace_ratio", "nc2_equinorm", "nc2_equiangular", "nc3"):
        assert getattr(m, name) == pytest.approx(0.0, abs=1e-10), name
    assert m.nc2_equinorm_w == pytest.approx(0.0, abs=1e-10)
    assert m.nc2_equiangular_w == pytest.approx(0.0, abs=1e-10)
    # an older toolbox took argmin of H Wᵀ for NC4 (a sign error): that scores 0 here, not 1
    assert m.nc4 == 1.0
    assert (h @ w.T).argmin(dim=1).eq(y).float().mean() == 0.0


def _reference(h, y, w, b, c):
    """Papyan et al.'s definitions with explicit loops, numpy float64."""
    h, y, w, b = h.numpy(), y.numpy(), w.numpy(), b.numpy()
    n, d = h.shape
    mus = np.stack([h[y == k].mean(axis=0) for k in range(c)])
    mu_g = mus.mean(axis=0)
    sw = np.zeros((d, d))
    for i in range(n):
        e = h[i] - mus[y[i]]
        sw += np.outer(e, e) / n
    sb = np.zeros((d, d))
    for k in range(c):
        e = mus[k] - mu_g
        sb += np.outer(e, e) / c
    nc1 = np.trace(sw @ np.linalg.pinv(sb)) / c
    cen = mus - mu_g
    norms = np.linalg.norm(cen, axis=1)
    cos = [cen[i] @ cen[j] / (norms[i] * norms[j]) for i in range(c) for j in range(c) if i != j]
    equiang = np.mean(np.abs(np.array(cos) + 1 / (c - 1)))
    nc3 = np.linalg.norm(w / np.linalg.norm(w) - cen / np.linalg.norm(cen))
    agree = 0
    for i in range(n):
        pred = np.argmax(w @ h[i] + b)
        near = np.argmin([np.linalg.norm(h[i] - mus[k]) for k in range(c)])
        agree += int(pred == near)
    return nc1, norms.std() / norms.mean(), equiang, nc3, agree / n


def test_matches_loop_reference_on_random_features(gen):
    c, d, n = 4, 6, 60
    y = torch.arange(n) % c
    h = (
        torch.randn(n, d, generator=gen, dtype=torch.float64)
        + 2 * torch.randn(c, d, generator=gen, dtype=torch.float64)[y]
    )
    w = torch.randn(c, d, generator=gen, dtype=torch.float64)
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    m = neural_collapse_metrics(h, y, w, b)
    nc1, equinorm, equiang, nc3, nc4 = _reference(h, y, w, b, c)
    assert m.nc1 == pytest.approx(nc1, rel=1e-10)
    assert m.nc2_equinorm == pytest.approx(equinorm, rel=1e-10)
    assert m.nc2_equiangular == pytest.approx(equiang, rel=1e-10)
    assert m.nc3 == pytest.approx(nc3, rel=1e-10)
    assert m.nc4 == pytest.approx(nc4)
    assert m.nc1 > 0.1 and 0.0 < m.nc4 < 1.0


def test_imbalanced_orthogonal_frame(gen):
    # bias-free deep linear nets on imbalanced data: orthogonal class means, lengths by class count
    c, d = 3, 5
    q, _ = torch.linalg.qr(torch.randn(d, c, generator=gen, dtype=torch.float64))
    lengths = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    means = (q * lengths).T
    counts = [30, 10, 3]
    h = torch.cat([means[k].expand(counts[k], d) for k in range(c)])
    y = torch.cat([torch.full((counts[k],), k) for k in range(c)])
    m = neural_collapse_metrics(h, y, means)
    assert m.nc2_orthogonal == pytest.approx(0.0, abs=1e-12)
    assert m.nc1 == pytest.approx(0.0, abs=1e-12)
    assert m.nc4 == 1.0
    assert m.nc2_equinorm > 0.1  # not an ETF: the lengths differ


def test_metric_errors(gen):
    h = torch.randn(6, 3, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ShapeMismatchError, match="features must be a matrix"):
        neural_collapse_metrics(h[None], y, torch.randn(3, 3))
    with pytest.raises(ShapeMismatchError, match=r"shape \[C, 3\]"):
        neural_collapse_metrics(h, y, torch.randn(3, 4))
    with pytest.raises(EmptyDataError, match=r"classes \[3\]"):
        neural_collapse_metrics(h, y, torch.randn(4, 3))
    with pytest.raises(ShapeMismatchError, match="labels must have shape"):
        neural_collapse_metrics(h, y[:5], torch.randn(3, 3))


def _net():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_monitor_through_attach(gen):
    model = _net()
    X = torch.randn(30, 4, generator=gen)
    y = torch.arange(30) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = NeuralCollapse(lambda x: model[:-1](x), model[-1], (X, y), model=model, every=2)
    handle = attach(opt, [monitor], HistorySink())
    model.train()
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    assert handle.sink.steps("nc/nc1") == [2, 4]
    direct = neural_collapse_metrics(model[:-1](X), y, model[-1].weight, model[-1].bias)
    assert handle.sink.last("nc/nc1") == pytest.approx(direct.nc1, rel=1e-6)
    assert model.training


def test_monitor_bad_input_at_attach(gen):
    model = _net()
    X = torch.randn(30, 4, generator=gen)
    y = torch.arange(30) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="feature-extractor callable"):
        NeuralCollapse(None, model[-1], (X, y))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        NeuralCollapse(lambda x: x, model, (X, y))  # type: ignore[arg-type]
    with pytest.raises(ShapeMismatchError, match=r"shape \[N=30, D=6\]"):
        attach(opt, [NeuralCollapse(lambda x: model(x), model[-1], (X, y))])
    with pytest.raises(ShapeMismatchError, match="feature extractor failed"):
        attach(opt, [NeuralCollapse(lambda x: model[:-1](x[:, :2]), model[-1], (X, y))])
    with pytest.raises(EmptyDataError, match="absent"):
        attach(opt, [NeuralCollapse(lambda x: model[:-1](x), model[-1], (X, y % 2))])
    head_only = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ParameterError, match="optimizer does not update"):
        attach(head_only, [NeuralCollapse(lambda x: model[:-1](x), model[-1], (X, y))])
