"""Edge of stability on digits: sharpness·η/2 rises and settles at 1 for every η."""

from __future__ import annotations

import json
import statistics

import pytest

from curvlab.phenomena import EoSConfig, edge_of_stability

CFG = EoSConfig(etas=(0.35, 0.5, 0.6), control_eta=None, steps=700, every=25)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return edge_of_stability(CFG, out_dir=tmp_path_factory.mktemp("eos"))


def test_sharpness_hovers_at_two_over_eta(result):
    runs = result.numbers["runs"]
    assert set(runs) == {"0.35", "0.5", "0.6"}
    for eta, run in runs.items():
        # progressive sharpening: starts well below the threshold ...
        assert run["initial_ratio"] < 0.9, eta
        # ... then sits at it (measured medians 1.03) and never shoots far above
        assert 0.8 <= run["median_ratio_second_half"] <= 1.2, eta
        assert run["max_ratio"] <= 1.5, eta
        # the loss keeps falling, non-monotonically
        assert run["loss_increases"] > 0 and run["loss_last"] < 0.2 * run["loss_first"], eta
        assert run["failures"] == 0


def test_warm_start_needs_fewer_hvps(result):
    # while the top eigenvector drifts slowly (η = 0.35 sharpens for ~300 steps) the warm start
    # halves the cost (measured 13 -> 6); at the edge with large η the eigenvector oscillates
    # between checks and the saving vanishes (η = 0.6: ~13), which the JSON reports as measured
    run = result.numbers["runs"]["0.35"]
    assert statistics.median(run["matvecs"][1:]) <= 0.7 * run["matvecs"][0]


def test_outputs(result):
    doc = json.loads(result.json_path.read_text())
    assert doc["reproduced"] is True and doc["phenomenon"] == "eos"
    assert result.figure.stat().st_size > 10_000
