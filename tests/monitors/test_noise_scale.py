"""Gradient noise scale: exact on a Gaussian mean-estimation problem; scaling rules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.errors import ParameterError
from curvlab.monitors import (
    GradientNoiseScale,
    HistorySink,
    attach,
    lr_scaling_rule,
    noise_scale_from_gradients,
    scale_lr,
)


class Centre(nn.Module):
    """Loss ½‖w − x‖² per example: per-example gradient w − x, covariance σ²I, G = w − μ."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return self.w - x


def _half_sq(out, _target):
    return 0.5 * (out**2).sum(dim=1).mean()


def test_b_simple_on_known_covariance(gen):
    d, sigma, n = 5, 1.0, 20000
    mu = torch.zeros(d, dtype=torch.float64)
    w = torch.full((d,), 0.5 / math.sqrt(d), dtype=torch.float64)  # ‖G‖² = 0.25
    X = mu + sigma * torch.randn(n, d, generator=gen, dtype=torch.float64)
    model = Centre(w)
    # B_simple = tr(Σ)/‖G‖² = d σ² / 0.25 = 20 (empirical pool moments, so compute them exactly)
    tr_pool = float(((X - X.mean(0)) ** 2).sum(1).mean())
    g_pool = float(((w - X.mean(0)) ** 2).sum())
    k, b = 200, 16
    mon = GradientNoiseScale(
        model,
        _half_sq,
        (X, torch.zeros(n)),
        batch_size=b,
        num_batches=k,
        generator=torch.Generator().manual_seed(1),
        every=1,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.w.grad = torch.full_like(model.w, 7.0)
    handle = attach(opt, [mon], HistorySink())
    values = handle.check_now()
    assert torch.equal(model.w.grad, torch.full_like(model.w, 7.0))  # .grad untouched
    # trace: chi-square with (k-1)d dof, relative std sqrt(2/((k-1)d)) = 0.045 -> 4.5 sigma = 0.2
    assert values["noise_scale/trace_cov"] == pytest.approx(tr_pool, rel=0.2)
    # ‖G‖²: error std ≈ sqrt(4 ‖G‖² σ²/(kB)) + tr/(kB) noise ≈ 0.02 -> 0.1 is > 4 sigma
    assert values["noise_scale/grad_norm_sq"] == pytest.approx(g_pool, abs=0.1)
    assert values["noise_scale/b_simple"] == pytest.approx(tr_pool / g_pool, rel=0.45)
    eff = values["noise_scale/batch_efficiency"]
    assert eff == pytest.approx(1 / (1 + values["noise_scale/b_simple"] / b))


def test_estimator_is_unbiased_in_expectation(gen):
    # batches drawn i.i.d. with replacement: mean over many repetitions matches exactly
    d, b, k, reps = 3, 4, 5, 4000
    sigma2 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g_true = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    traces, norms = [], []
    for _ in range(reps):
        noise = torch.randn(k, b, d, generator=gen, dtype=torch.float64) * sigma2.sqrt()
        grads = g_true + noise.mean(dim=1)
        out = noise_scale_from_gradients(grads, b)
        traces.append(out["trace_cov"])
        norms.append(out["grad_norm_sq"])
    tr = torch.tensor(traces)
    gn = torch.tensor(norms)
    # tolerance: 5 standard errors of the mean over reps
    assert abs(float(tr.mean()) - 6.0) < 5 * float(tr.std()) / math.sqrt(reps)
    assert abs(float(gn.mean()) - 2.25) < 5 * float(gn.std()) / math.sqrt(reps)


def test_scaling_rules():
    assert scale_lr(0.1, 32, 128) == pytest.approx(0.4)
    assert scale_lr(0.1, 32, 128, rule="sqrt") == pytest.approx(0.2)
    with pytest.raises(ValueError, match="'linear'"):
        scale_lr(0.1, 32, 64, rule="cubic")
    assert lr_scaling_rule(torch.optim.Adam) == "sqrt"
    assert lr_scaling_rule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)) == "linear"


def test_errors(gen):
    model = nn.Linear(3, 1)
    X, y = torch.randn(20, 3, generator=gen), torch.randn(20, 1, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="num_batches must be an integer >= 2"):
        GradientNoiseScale(model, nn.functional.mse_loss, (X, y), batch_size=4, num_batches=1)
    with pytest.raises(ValueError, match="data pool has 20 examples"):
        attach(opt, [GradientNoiseScale(model, nn.functional.mse_loss, (X, y), batch_size=8)])
    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ParameterError, match="no parameter requires grad"):
        attach(opt, [GradientNoiseScale(frozen, nn.functional.mse_loss, (X, y), batch_size=2)])
    with pytest.raises(ValueError, match="k >= 2"):
        noise_scale_from_gradients(torch.zeros(1, 3), 4)
