import pytest
import torch

from curvlab.estimators.probes import gaussian, rademacher, rademacher_like, sample_probes


def test_rademacher_values_and_both_signs(gen):
    z = rademacher(10_000, generator=gen)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    # P(+1) = 1/2: with n = 1e4 the count has std 50, so 5 std = 250.
    assert abs(int((z > 0).sum()) - 5_000) < 250


def test_rademacher_second_moment_is_identity(gen):
    n, k = 6, 40_000
    z = rademacher(n, k, generator=gen, dtype=torch.float64)
    second = z @ z.T / k
    # off-diagonal entries: mean of k products of independent ±1, std 1/sqrt(k) = 0.005
    assert torch.allclose(second, torch.eye(n, dtype=torch.float64), atol=0.025)
    assert z.mean().abs() < 0.02


def test_gaussian_moments(gen):
    z = gaussian(5, 40_000, generator=gen, dtype=torch.float64)
    assert z.mean().abs() < 0.02
    # entries of z zᵀ/k: diagonal var 2/k, off-diagonal var 1/k; 5 std < 0.04
    assert torch.allclose(z @ z.T / 40_000, torch.eye(5, dtype=torch.float64), atol=0.04)


def test_probes_reproducible_from_generator():
    a = sample_probes(7, 3, generator=torch.Generator().manual_seed(3))
    b = sample_probes(7, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_rademacher_like_matches_shapes(gen):
    ts = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5)]
    zs = rademacher_like(ts, generator=gen)
    assert [z.shape for z in zs] == [t.shape for t in ts]
    assert [z.dtype for z in zs] == [t.dtype for t in ts]


def test_unknown_probe_kind():
    with pytest.raises(ValueError, match="rademacher"):
        sample_probes(3, 2, kind="sobol")
