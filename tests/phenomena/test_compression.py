"""The compression phenomenon: OBS vs magnitude pruning, trace vs top-eigenvalue bit allocation."""

from __future__ import annotations

import json

import pytest

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena import CompressionConfig, compression
from curvlab.phenomena.compression import _allocation_checks
from curvlab.phenomena.index import quick_config


def test_obs_beats_magnitude_and_allocation_is_reported(tmp_path):
    res = compression(quick_config("compression"), out_dir=tmp_path)
    p = res.numbers["pruning"]
    assert res.numbers["dense"]["accuracy"] > 0.9
    for o, m in zip(p["obs"], p["magnitude"]):
        assert o["accuracy"] > m["accuracy"]
    for row in res.numbers["allocation"]["budgets"]:
        for key in ("trace", "top_eigenvalue", "uniform"):
            assert row[key]["average_bits"] <= row["budget"] + 1e-12
    doc = json.loads((tmp_path / "compression.json").read_text())
    assert doc["numbers"]["checks"] == res.numbers["checks"]
    assert doc["reproduced"] is all(res.numbers["checks"].values())


def _row(budget, trace, top, uniform):
    def entry(bits, loss):
        return {"bits": bits, "average_bits": sum(bits.values()) / len(bits), "loss": loss}

    return {"budget": budget, "trace": entry(*trace), "top_eigenvalue": entry(*top),
            "uniform": entry(*uniform)}  # fmt: skip


def test_identical_allocations_are_not_a_win():
    same = _row(4.0, ({"a": 4, "b": 4}, 0.5), ({"a": 4, "b": 4}, 0.5), ({"a": 4, "b": 4}, 0.5))
    checks, verdict = _allocation_checks([same])
    assert checks == {
        "trace_allocation_beats_top_eigenvalue": False,
        "trace_allocation_beats_uniform_at_equal_size": False,
    }
    assert "not distinguishable at this scale" in verdict
    win = _row(4.0, ({"a": 2, "b": 6}, 0.4), ({"a": 6, "b": 2}, 0.7), ({"a": 4, "b": 4}, 0.5))
    checks, verdict = _allocation_checks([win])
    assert all(checks.values()) and verdict == "trace beats top eigenvalue"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_train": 1797}, "num_train must be in"),
        ({"sparsities": (1.0,)}, r"sparsities must be in \[0, 1\)"),
        ({"budgets": (1.0,)}, "must be >= the smallest choice"),
        ({"damp": 0.0}, "CompressionConfig.damp must be > 0"),
    ],
)
def test_bad_config(kwargs, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        CompressionConfig(**kwargs)
