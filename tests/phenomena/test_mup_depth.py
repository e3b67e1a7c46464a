"""μP width sweep and Saxe's depth sweep at their quick sizes: numbers recorded, graded as measured."""

from __future__ import annotations

import json

import pytest

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena.depth import DepthConfig, depth_sweep
from curvlab.phenomena.mup import MuPConfig, mup_transfer


def test_mup_quick_records_best_lr_per_width(tmp_path):
    cfg = MuPConfig.quick()
    res = mup_transfer(cfg, out_dir=tmp_path)
    for kind in ("sp", "mup"):
        best = res.numbers[kind]["best_log2_lr"]
        assert len(best) == len(cfg.widths) and set(best) <= set(cfg.log2_lrs)
        assert res.numbers[kind]["drift_log2"] == best[-1] - best[0]
    assert json.loads(res.json_path.read_text())["phenomenon"] == "mup"


def test_depth_quick_orthogonal_time_depth_independent(tmp_path):
    res = depth_sweep(DepthConfig.quick(), out_dir=tmp_path)
    assert res.numbers["orthogonal_spread"] <= 1.3
    assert res.numbers["runs_not_reaching_half"] == 0
    assert res.figure.exists()


def test_bad_configs():
    with pytest.raises(InvalidArgumentError, match="needs >= 2 positive widths"):
        MuPConfig(widths=(32,))
    with pytest.raises(InvalidArgumentError, match="needs >= 2 depths"):
        DepthConfig(depths=(1, 3))
