"""Linear mode connectivity on digits: shared init connected, independent inits separated."""

from __future__ import annotations

import json

import pytest

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena.mode_connectivity import ModeConnectivityConfig, mode_connectivity


def test_quick_run_measures_barriers(tmp_path):
    res = mode_connectivity(ModeConnectivityConfig.quick(), out_dir=tmp_path)
    same, diff = res.numbers["same_init"], res.numbers["different_init"]
    assert same["barrier"] < 0.05 < diff["barrier"]
    assert set(same["layer_barriers"]) == {"0", "2", "4"}
    assert res.reproduced is True
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "mode-connectivity" and res.figure.exists()


def test_bad_config():
    with pytest.raises(InvalidArgumentError, match=r"ModeConnectivityConfig\.width must be > 0"):
        ModeConnectivityConfig(width=0)
