"""CurvatureLR: exact on a quadratic; NaN in negative curvature."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.monitors import CurvatureLR, attach


class Quadratic(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return x


def test_line_search_lr_on_quadratic(gen):
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    model = Quadratic(torch.tensor([1.0, -2.0], dtype=torch.float64))

    def loss_fn(out, _y):
        return 0.5 * model.w @ A @ model.w + 0 * out.sum()

    X = torch.zeros(1, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    values = attach(opt, CurvatureLR(model, loss_fn, (X, X))).check_now()
    g = A @ model.w.detach()
    expected = float(g @ g / (g @ A @ g))
    assert values["curvature_lr/lr"] == pytest.approx(expected, rel=1e-12)
    assert values["curvature_lr/lr_ratio"] == pytest.approx(expected / 0.1, rel=1e-12)
    assert values["curvature_lr/matvecs"] == 1.0
    # a GD step with that lr minimises the quadratic along g exactly
    w = model.w.detach() - expected * g
    ts = torch.linspace(0.9, 1.1, 21, dtype=torch.float64)
    losses = [
        float(
            0.5 * (model.w.detach() - t * expected * g) @ A @ (model.w.detach() - t * expected * g)
        )
        for t in ts
    ]
    assert min(losses) == pytest.approx(float(0.5 * w @ A @ w))


def test_negative_curvature_gives_nan():
    A = torch.tensor([[-1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    model = Quadratic(torch.tensor([1.0, 1.0], dtype=torch.float64))

    def loss_fn(out, _y):
        return 0.5 * model.w @ A @ model.w + 0 * out.sum()

    X = torch.zeros(1, 1, dtype=torch.float64)
    values = attach(
        torch.optim.SGD(model.parameters(), lr=0.1), CurvatureLR(model, loss_fn, (X, X))
    ).check_now()
    assert math.isnan(values["curvature_lr/lr"]) and values["curvature_lr/gHg"] < 0
