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


def test_every_bit_of_the_random_words_is_a_fair_independent_sign(gen):
    # each sign is one bit of a 64-bit random word: every bit position must be fair and
    # uncorrelated with its neighbour. k words: per-position mean ~ N(0, 1/k); 5.5 std with
    # k = 40,000 is 0.0275 (p < 1e-6 over the 2 x 64 statistics)
    k = 40_000
    z = rademacher(64 * k, generator=gen, dtype=torch.float64).view(k, 64)
    assert z.mean(0).abs().max() < 0.0275
    assert (z[:, :-1] * z[:, 1:]).mean(0).abs().max() < 0.0275


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (9,), (65,), (3, 5), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rademacher_any_length_and_dtype(gen, shape, dtype):
    z = rademacher(*shape, generator=gen, dtype=dtype)
    assert z.shape == shape and z.dtype == dtype and z.is_contiguous()
    assert bool(((z == 1) | (z == -1)).all())


def test_rademacher_and_gaussian_write_into_out(gen):
    for kind in ("rademacher", "gaussian"):
        buffer = torch.full((3, 11), 7.0)
        got = sample_probes(3, 11, kind, generator=torch.Generator().manual_seed(5), out=buffer)
        assert got is buffer
        fresh = sample_probes(3, 11, kind, generator=torch.Generator().manual_seed(5))
        assert torch.equal(buffer, fresh)


def test_rademacher_out_of_the_wrong_shape_is_refused(gen):
    from curvlab.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match="contiguous tensor of shape"):
        rademacher(4, 3, generator=gen, out=torch.empty(3, 4))
    with pytest.raises(ShapeMismatchError):
        rademacher(4, 3, generator=gen, out=torch.empty(3, 4).T)


def test_rademacher_out_decides_dtype_and_device(gen):
    buffer = torch.zeros(5, 3, dtype=torch.float64)
    z = rademacher(5, 3, generator=gen, dtype=torch.float32, out=buffer)
    assert z is buffer and z.dtype == torch.float64
    assert bool(((z == 1) | (z == -1)).all())
