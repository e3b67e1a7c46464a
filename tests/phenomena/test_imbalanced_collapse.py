"""Imbalanced neural collapse in the bias-free deep linear UFM: closed form against GD."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena import imbalanced_collapse as module
from curvlab.phenomena.imbalanced_collapse import (
    ImbalancedCollapseConfig,
    imbalanced_collapse,
    ufm_geometry,
)


def test_one_layer_closed_form_and_minority_collapse():
    # L = 1: P_k = 1 - N sqrt(lambda_W lambda_H / n_k) when positive, else 0 (the class collapses)
    counts, lam = (50, 10, 1), 2e-2
    p = ufm_geometry(counts, depth=1, lambda_w=lam, lambda_h=lam)["output"]
    n = sum(counts)
    expected = [max(0.0, 1 - n * (lam * lam / c) ** 0.5) for c in counts]
    assert p == pytest.approx(expected, abs=1e-9)
    assert p[0] > p[1] > 0 and p[2] == 0.0


def test_closed_form_gradient_matches_autograd():
    cfg = ImbalancedCollapseConfig(counts=(3, 2), width=3, depth=3)
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((3, 3), (3, 3), (2, 3))]
    h = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    y = torch.eye(2, dtype=torch.float64)[:, [0, 0, 0, 1, 1]]
    params = [p.clone().requires_grad_(True) for p in (*ws, h)]
    expected = torch.autograd.grad(module._objective(params[:-1], params[-1], y, cfg), params)
    for got, want in zip(module._gradients(ws, h, y, cfg), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_quick_run_matches_the_closed_form(tmp_path):
    res = imbalanced_collapse(ImbalancedCollapseConfig.quick(), out_dir=tmp_path)
    n = res.numbers
    # GD stops at a gradient norm below 1e-7 (depth 3): the class-mean lengths at every layer agree
    # with ufm_geometry (measured 7e-11) well inside the tolerance derived from that gradient norm
    for run in (n["balanced"], n["imbalanced"]):
        assert run["grad_norm"] < 1e-7 and run["steps"] < ImbalancedCollapseConfig().max_steps
        assert run["max_rel_error_norms"] < run["tolerance"] < 1e-2
    norms = n["imbalanced"]["predicted_norms"][0]
    assert norms[0] < norms[1] < norms[2]  # h-bar_k is longer for the smaller classes
    assert res.reproduced is True
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "imbalanced-collapse" and res.figure.exists()


def test_a_minority_collapsed_critical_point_is_not_reproduced():
    # with weight decay 2e-2 this start ends at a critical point where one imbalanced class has
    # collapsed to 0 (P = 0 is a local minimum for depth >= 2): the grading must say so
    cfg = ImbalancedCollapseConfig(counts=(12, 6, 3), width=4, lambda_w=2e-2, lambda_h=2e-2)
    res = imbalanced_collapse(replace(cfg, grad_tol=1e-7))
    imb = res.numbers["imbalanced"]
    assert imb["grad_norm"] < 1e-7 and imb["max_rel_error_norms"] > 0.5
    assert res.numbers["checks"]["balanced_lengths_every_layer_match_closed_form_<_tol"]
    assert not res.numbers["checks"]["imbalanced_lengths_every_layer_match_closed_form_<_tol"]
    assert res.reproduced is False and "imbalanced_lengths" in res.caption[0]


def test_bad_inputs():
    with pytest.raises(InvalidArgumentError, match="width >= the number of classes"):
        ImbalancedCollapseConfig(counts=(3, 2, 1), width=2)
    with pytest.raises(
        InvalidArgumentError, match=r"ImbalancedCollapseConfig.counts\[1\] must be > 0"
    ):
        ImbalancedCollapseConfig(counts=(3, 0))
    with pytest.raises(InvalidArgumentError, match="ufm_geometry needs class counts >= 1"):
        ufm_geometry([3, 0], depth=2, lambda_w=1e-2, lambda_h=1e-2)
