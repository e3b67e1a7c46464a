"""The Newton phenomenon: quadratic convergence, the regularized method's rate, saddle escape."""

from __future__ import annotations

import json

import pytest

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena import NewtonConfig, loglog_slope, newton_phenomenon
from curvlab.phenomena.index import quick_config


def test_loglog_slope_is_exact_on_power_laws():
    assert loglog_slope([1.0, 10.0, 100.0], [3.0, 3e-4, 3e-8]) == pytest.approx(-4.0, abs=1e-12)
    assert loglog_slope([1e-2, 1e-4], [1e-4, 1e-8]) == pytest.approx(2.0, abs=1e-12)


def test_newton_claims_hold_at_quick_size(tmp_path):
    res = newton_phenomenon(quick_config("newton"), out_dir=tmp_path)
    local, glob, saddle = (res.numbers[k] for k in ("local", "global", "saddle"))
    # (a) pure Newton from zero: 1e-10 within 10 iterations, slope of e_{t+1} on e_t near 2
    assert local["iterations_to_target"] <= 10
    assert abs(local["slope"] - 2.0) <= 0.3
    assert min(local["suboptimality"]) >= -1e-14  # f* is the exact minimum
    # (b) regularized Newton: k²(f − f*) stays below H R³, decays at least like 1/k² after its peak
    assert glob["max_k2_gap"] <= glob["bound_H_R3"] and glob["slope"] <= -2.0
    # (c) plain Newton lands on the saddle, saddle-free Newton finds the minimum
    assert saddle["hessian_at_saddle_min_eig"] < 0
    assert saddle["plain_loss"][-1] == pytest.approx(saddle["loss_at_saddle"], rel=1e-6)
    assert saddle["saddle_free_loss"][-1] < 1e-10
    assert res.reproduced is True
    doc = json.loads((tmp_path / "newton.json").read_text())
    assert doc["reproduced"] is True and (tmp_path / "newton.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"lam": 0.0}, "NewtonConfig.lam must be > 0"),
        ({"linear_singular_values": (1.0,) * 5}, "needs 1 to linear_dim = 4 values"),
        ({"regularized_steps": 4}, "regularized_steps must be >= 8"),
    ],
)
def test_bad_config(kwargs, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        NewtonConfig(**kwargs)
