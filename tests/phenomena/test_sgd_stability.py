"""SGD stability (Wu & Su): the trace measurements against closed forms, and the quick sweep."""

from __future__ import annotations

import json

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.operators import HessianOperator
from curvlab.phenomena.eos import half_square_loss
from curvlab.phenomena.sgd_stability import (
    DiagonalLinearNet,
    SGDStabilityConfig,
    TwoLayerReLU,
    sgd_stability,
)

DT = torch.float64


def _hessian(net, x, y):
    return HessianOperator(net, half_square_loss, (x, y[:, None]), reduction="mean").to_dense()


def test_diagonal_net_trace_is_four_times_the_squared_norm_at_any_point():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=gen, dtype=DT)
    x = x / x.pow(2).mean(0).sqrt()  # unit mean square per column
    y = torch.randn(7, generator=gen, dtype=DT)  # far from interpolation: residuals are large
    net = DiagonalLinearNet(*torch.randn(2, 5, generator=gen, dtype=DT))
    u, v = net.u.detach(), net.v.detach()
    closed = 4 * float((u**2 + v**2).sum())
    assert float(_hessian(net, x, y).trace()) == pytest.approx(closed, rel=1e-12)
    assert net.gauss_newton_trace(x) == pytest.approx(closed, rel=1e-12)
    assert 4 * net.norm() == pytest.approx(closed, rel=1e-12)


def test_relu_net_trace_is_the_mean_squared_output_gradient():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 3, generator=gen, dtype=DT)
    y = torch.randn(9, generator=gen, dtype=DT)
    net = TwoLayerReLU(
        torch.randn(6, 3, generator=gen, dtype=DT), torch.randn(6, generator=gen, dtype=DT)
    )
    jac = torch.func.jacrev(
        lambda w, a: TwoLayerReLU.batched((w[None], a[None]), x)[0], argnums=(0, 1)
    )(net.w.detach(), net.a.detach())
    gn = float(sum(j.flatten(1).pow(2).sum(1) for j in jac).mean())
    assert float(_hessian(net, x, y).trace()) == pytest.approx(gn, rel=1e-12)
    assert net.gauss_newton_trace(x) == pytest.approx(gn, rel=1e-12)


def test_quick_sweep_numbers_are_consistent(tmp_path):
    cfg = SGDStabilityConfig.quick()
    res = sgd_stability(cfg, out_dir=tmp_path)
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "sgd-stability" and res.figure.exists()
    n = res.numbers
    for name in ("relu", "diagonal"):
        summary = n[name]["summary"]
        for opt in ("sgd", "gd"):
            for rec in n[name]["runs"][opt]:
                if rec["diverged"]:
                    assert not rec["minimum"]
                    continue
                assert rec["trace_eta_over_2"] == pytest.approx(rec["trace"] * rec["eta"] / 2)
                assert rec["lambda_min"] <= rec["lambda_max"] <= rec["trace"] + 1e-9
        minima = [r for r in n[name]["runs"]["sgd"] if r["minimum"]]
        assert summary["sgd_minima"] == len(minima)
        assert summary["max_sgd_trace_eta_over_2"] == max(r["trace_eta_over_2"] for r in minima)
    assert n["checks"]["trace_bound_at_every_sgd_minimum"] == all(
        n[k]["summary"]["max_sgd_trace_eta_over_2"] <= 1 for k in ("relu", "diagonal")
    )
    assert n["checks"]["curvlab_trace_matches_closed_form_1e-8"]
    assert res.reproduced == all(n["checks"].values())


def test_bad_config():
    with pytest.raises(InvalidArgumentError, match=">= 3 positive step sizes"):
        SGDStabilityConfig(relu_etas=(0.1, 0.2))
    with pytest.raises(InvalidArgumentError, match="steps must be > 0"):
        SGDStabilityConfig(steps=0)
