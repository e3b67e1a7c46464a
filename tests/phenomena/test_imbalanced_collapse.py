"""Imbalanced neural collapse in the bias-free deep linear UFM: closed form against GD."""

from __future__ import annotations

import json

import pytest

from curvlab.errors import InvalidArgumentError
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


def test_quick_run_matches_the_closed_form(tmp_path):
    res = imbalanced_collapse(ImbalancedCollapseConfig.quick(), out_dir=tmp_path)
    n = res.numbers
    # GD to a gradient norm of 1e-7 is the direct minimisation: the class-mean lengths at every
    # layer agree with ufm_geometry (measured 5e-9), and the imbalanced lengths are distinct
    assert n["imbalanced"]["max_rel_error_norms"] < 1e-6
    assert n["balanced"]["max_rel_error_norms"] < 1e-6
    norms = n["imbalanced"]["predicted_norms"][0]
    assert norms[0] < norms[1] < norms[2]  # h-bar_k is longer for the smaller classes
    assert res.reproduced is True
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "imbalanced-collapse" and res.figure.exists()


def test_bad_inputs():
    with pytest.raises(InvalidArgumentError, match="width >= the number of classes"):
        ImbalancedCollapseConfig(counts=(3, 2, 1), width=2)
    with pytest.raises(InvalidArgumentError, match="ufm_geometry needs class counts >= 1"):
        ufm_geometry([3, 0], depth=2, lambda_w=1e-2, lambda_h=1e-2)
