"""Matrix sensing: symmetric k>r sub-linear, k=r and asymmetric linear, ScaledGD(λ) α-robust."""

from __future__ import annotations

import json

import pytest

from curvlab.phenomena import MatrixSensingConfig, matrix_sensing

# the default problem (n=20, r=2, m=600) with a shorter run and fewer α values
CFG = MatrixSensingConfig(
    steps=2000, alphas_gd=(0.5, 2.0), alphas_precond=(0.01, 1.0), symmetric_scaledgd=False
)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return matrix_sensing(CFG, out_dir=tmp_path_factory.mktemp("ms"))


def test_writes_figure_and_json(result):
    assert result.figure.exists() and result.figure.stat().st_size > 10_000
    doc = json.loads(result.json_path.read_text())
    assert doc["phenomenon"] == "matrix-sensing"
    assert doc["reproduced"] is True
    assert len(doc["caption"]) == 2


def test_symmetric_exact_linear_over_sublinear(result):
    runs = result.numbers["runs"]
    exact, over = runs["symmetric k=r"], runs["symmetric k=6"]
    # linear: machine precision within a few hundred steps (measured 362)
    assert exact["first_below_tol"] is not None and exact["first_below_tol"] <= 600
    # sub-linear: still above 1e-5 after 2000 steps, and a power-law tail (not a straight semilog)
    assert over["final_error"] > 1e-5
    assert -2.5 < over["loglog_slope_second_half"] < -0.1
    assert over["rate_log10_per_1000_steps"] is None


def test_asymmetric_linear_with_alpha_dependent_rate(result):
    runs = result.numbers["runs"]
    small, large = runs["asymmetric GD α=0.5"], runs["asymmetric GD α=2"]
    over = runs["symmetric k=6"]
    assert large["final_error"] < 1e-7  # linear for a large enough α (measured 1.5e-9)
    assert large["final_error"] < 1e-4 * small["final_error"]  # rate grows with α
    assert large["final_error"] < 1e-3 * over["final_error"]  # asymmetry beats symmetry


def test_preconditioned_removes_alpha_dependence(result):
    runs = result.numbers["runs"]
    hits = [runs[f"asymmetric ScaledGD(λ) α={a:g}"]["first_below_tol"] for a in (0.01, 1.0)]
    assert all(h is not None for h in hits)
    assert max(hits) / min(hits) < 2.0  # α over 100×; GD's α² rate would differ 10⁴×
    assert all(result.numbers["checks"].values())
