"""Hessian outliers: the detector on a spectrum with known outliers, and the quick run."""

from __future__ import annotations

import json

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.estimators import eigsh, spectral_density
from curvlab.phenomena.hessian_outliers import (
    HessianOutliersConfig,
    _count_checks,
    count_outliers,
    hessian_outliers,
    slq_quantile,
)


def _diag(bulk: int, outliers: list[float]) -> torch.Tensor:
    values = torch.cat(
        [torch.linspace(0.0, 1.0, bulk, dtype=torch.float64), torch.tensor(outliers)]
    )
    return torch.diag(values.double())


@pytest.mark.parametrize("outliers", [[4.0, 5.0, 6.0], [3.0, 3.5, 4.0, 8.0, 9.0], []])
def test_detector_finds_exactly_the_planted_outliers(outliers):
    a = _diag(1000, outliers)  # outliers < 1% of n: the SLQ 99% quantile lies in the bulk
    esd = spectral_density(
        a, num_probes=4, lanczos_steps=40, generator=torch.Generator().manual_seed(0)
    )
    ritz = eigsh(
        a, k=len(outliers) + 5, tol=1e-8, generator=torch.Generator().manual_seed(1)
    ).values
    split = count_outliers(ritz, esd)
    assert split.count == len(outliers)
    # the bulk edge is the SLQ 99% quantile: inside the bulk [0, 1], below every outlier
    assert 0.9 <= split.bulk_edge <= 1.0 + 3 * esd.sigma
    if outliers:
        assert 1.0 < split.threshold < min(outliers)


def test_slq_quantile_is_exact_with_a_full_krylov_space():
    a = _diag(100, [])  # eigenvalues k/99; 100 steps integrate the measure exactly
    esd = spectral_density(
        a, num_probes=3, lanczos_steps=100, generator=torch.Generator().manual_seed(0)
    )
    # Rademacher probes weight each eigenvalue 1/n exactly: the first with mass >= 0.505 is the 51st
    assert slq_quantile(esd, 0.505) == pytest.approx(50 / 99, abs=1e-9)


def test_bad_detector_inputs():
    a = _diag(50, [])
    esd = spectral_density(a, num_probes=1, lanczos_steps=10)
    with pytest.raises(InvalidArgumentError, match="at least 2 Ritz values"):
        count_outliers([1.0], esd)
    with pytest.raises(InvalidArgumentError, match="min_gap must be a ratio > 1"):
        count_outliers([2.0, 1.0], esd, min_gap=1.0)
    with pytest.raises(InvalidArgumentError, match="bulk_quantile must lie in"):
        count_outliers([2.0, 1.0], esd, bulk_quantile=1.0)
    with pytest.raises(InvalidArgumentError, match="class_counts must be digits class counts"):
        HessianOutliersConfig(class_counts=(1,))
    with pytest.raises(InvalidArgumentError, match="losses must be a non-empty subset"):
        HessianOutliersConfig(losses=("hinge",))


def test_grading_is_exact_per_count():
    # one seed of two misses a count: that (loss, C) check fails, the grade is "partly" at best
    cfg = HessianOutliersConfig(class_counts=(3, 5), losses=("mse", "ce"), seeds=2)
    cases = [
        {"loss": loss, "classes": c, "seed": s, "hessian": {"outliers": found}}
        for loss, c, s, found in [
            ("mse", 3, 0, 3),
            ("mse", 3, 1, 3),
            ("mse", 5, 0, 0),
            ("mse", 5, 1, 5),
            ("ce", 3, 0, 2),
            ("ce", 3, 1, 2),
            ("ce", 5, 0, 4),
            ("ce", 5, 1, 3),
        ]
    ]
    checks, text, differ, varies = _count_checks(cases, cfg)
    assert checks == {
        "mse_C3_hessian_outliers_=_3_every_seed": True,
        "mse_C5_hessian_outliers_=_5_every_seed": False,
        "ce_C3_hessian_outliers_=_2_every_seed": True,
        "ce_C5_hessian_outliers_=_4_every_seed": False,
    }
    assert text == "MSE C=3: 3,3; MSE C=5: 0,5; CE C=3: 2,2; CE C=5: 4,3"
    assert differ == ["MSE C=5: 0,5 vs 5", "CE C=5: 4,3 vs 4"]
    assert varies == ["MSE C=5", "CE C=5"]


def test_quick_run(tmp_path):
    res = hessian_outliers(HessianOutliersConfig.quick(), out_dir=tmp_path)
    n = res.numbers
    (case,), (wide,) = n["cases"], n["wide_cases"]
    # measured: 3 classes (MSE) -> exactly 3 outliers, Hessian and GGN, at both widths
    assert case["hessian"]["outliers"] == case["ggn"]["outliers"] == 3
    assert wide["hessian"]["outliers"] == 3
    assert wide["hessian"]["num_params"] > case["hessian"]["num_params"]
    assert max(n["hessian_vs_ggn_top_rel_diff"].values()) < 0.1
    assert all(n["checks"].values()) and res.reproduced is True
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "hessian-outliers" and res.figure.exists()
