"""Hessian outliers: the detector on a spectrum with known outliers, and the quick run."""

from __future__ import annotations

import json

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.estimators import eigsh, spectral_density
from curvlab.phenomena.hessian_outliers import (
    HessianOutliersConfig,
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


def test_quick_run(tmp_path):
    res = hessian_outliers(HessianOutliersConfig.quick(), out_dir=tmp_path)
    n = res.numbers
    case, wide = n["cases"][0], n["wide_case"]
    # measured: 3 classes (MSE) -> exactly 3 outliers, Hessian and GGN, at both widths
    assert case["hessian"]["outliers"] == case["ggn"]["outliers"] == 3
    assert wide["hessian"]["outliers"] == 3
    assert wide["hessian"]["num_params"] > case["hessian"]["num_params"]
    assert max(n["hessian_vs_ggn_top_rel_diff"].values()) < 0.1
    assert res.reproduced is True
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "hessian-outliers" and res.figure.exists()
