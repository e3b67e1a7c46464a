"""GFS-sharpness phenomenon: monotone decrease at the edge of stability on a scalar network."""

from __future__ import annotations

import json

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena.gfs import GFSConfig, gfs_sharpness, scalar_gfs_closed_form


def test_closed_form_is_the_minimum_reached_by_conservation():
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    gfs = scalar_gfs_closed_form(w)
    # recover c from Σ 1/(wᵢ² + c) by the product condition: the limit point is a minimum
    c = torch.linspace(-0.25, 2.0, 200001, dtype=torch.float64)
    prod = ((w[None, :] ** 2 + c[:, None]).prod(1) - 1).abs()
    best = float(c[prod.argmin()])
    assert gfs == pytest.approx(float((1 / (w**2 + best)).sum()), rel=1e-4)


def test_quick_run(tmp_path):
    res = gfs_sharpness(GFSConfig.quick(), out_dir=tmp_path)
    n = res.numbers
    assert n["gfs"][0] > n["edge"] > n["gfs"][-1]
    assert n["monotonicity_violations"] == 0 and n["loss_increases"] >= 3
    assert n["max_rel_error_vs_closed_form"] < 1e-4
    assert res.reproduced is True
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "gfs" and res.figure.exists()


def test_bad_config():
    with pytest.raises(InvalidArgumentError, match="positive product"):
        GFSConfig(w0=(1.0, -1.0))
