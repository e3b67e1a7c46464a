"""Trace and diagonal estimators: exact cases, variance-derived tolerances, budgets, blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab import CountingOperator, HessianOperator, diagonal, eigsh, trace
from curvlab.errors import NonFiniteError, NotSymmetricError
from curvlab.estimators._common import check_samples
from curvlab.operators import DenseOperator


def random_psd(n: int = 50, seed: int = 0, decay: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = (
        torch.exp(-decay * torch.arange(n, dtype=torch.float64))
        if decay
        else torch.rand(n, generator=g, dtype=torch.float64)
    )
    return Q @ torch.diag(ev) @ Q.T


def hutchinson_std(A: torch.Tensor, m: int) -> float:
    """Std of the m-probe Rademacher Hutchinson estimate: sqrt(2(‖A‖_F² − Σ a_ii²)/m)."""
    return math.sqrt(2 * (float((A * A).sum()) - float((A.diagonal() ** 2).sum())) / m)


def test_diagonal_matrices_are_exact_for_rademacher_probes():
    A = torch.diag(torch.arange(1.0, 8.0, dtype=torch.float64))
    est = trace(A, num_matvecs=5, method="hutchinson")
    assert float(est.value) == 28.0 and float(est.std_error) == 0.0
    d = diagonal(A, num_matvecs=3)
    torch.testing.assert_close(d.value, A.diagonal(), rtol=0, atol=0)


def test_hutch_plus_plus_is_exact_for_low_rank_matrices():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(60, 4, generator=g, dtype=torch.float64)
    A = U @ U.T  # rank 4 <= num_matvecs / 3: the sketch captures all of it
    est = trace(A, num_matvecs=15, method="hutch++", generator=g)
    assert abs(float(est.value) - float(A.trace())) < 1e-9


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_unbiased_within_variance_derived_tolerance(method):
    A = random_psd()
    m, reps = 30, 200
    g = torch.Generator().manual_seed(7)
    vals = torch.tensor([float(trace(A, m, method=method, generator=g).value) for _ in range(reps)])
    sd = hutchinson_std(A, m)  # Hutch++'s variance is no larger than Hutchinson's at this m
    # mean of `reps` estimates: standard error sd / sqrt(reps); allow 4 of them
    assert abs(float(vals.mean()) - float(A.trace())) < 4 * sd / math.sqrt(reps)
    if method == "hutchinson":  # the sample spread matches the closed-form variance
        assert 0.75 * sd < float(vals.std()) < 1.25 * sd


def test_reported_standard_error_matches_the_closed_form():
    A = random_psd(seed=1)
    est = trace(A, 400, method="hutchinson", generator=torch.Generator().manual_seed(2))
    sd = hutchinson_std(A, 400)
    assert 0.8 * sd < float(est.std_error) < 1.2 * sd
    assert abs(float(est.value) - float(A.trace())) < 4 * sd


def test_hutch_plus_plus_beats_hutchinson_on_a_decaying_spectrum():
    A = random_psd(decay=0.3)
    g = torch.Generator().manual_seed(3)
    err = {
        m: torch.tensor(
            [
                abs(float(trace(A, 30, method=m, generator=g).value) - float(A.trace()))
                for _ in range(50)
            ]
        ).mean()
        for m in ("hutchinson", "hutch++")
    }
    assert err["hutch++"] < err["hutchinson"] / 3


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_matvec_budget_is_respected(method):
    op = CountingOperator(DenseOperator(random_psd()))
    est = trace(op, 31, method=method, generator=torch.Generator().manual_seed(0))
    assert op.num_matvecs == est.num_matvecs == 31
    op.reset()
    diagonal(op, 17)
    assert op.num_matvecs == 17


def test_stopping_rule_on_the_standard_error():
    A = random_psd()
    est = trace(
        A, 10_000, method="hutchinson", rtol=0.01, generator=torch.Generator().manual_seed(0)
    )
    assert est.num_matvecs < 10_000
    assert float(est.std_error) <= 0.01 * abs(float(est.value))


def test_diagonal_converges_within_its_variance():
    A = random_psd(20)
    m = 2000
    d = diagonal(A, m, generator=torch.Generator().manual_seed(4))
    # per-coordinate std: sqrt(Σ_{l≠j} a_jl² / m)
    sd = ((A * A).sum(1) - A.diagonal() ** 2).sqrt() / math.sqrt(m)
    assert torch.all((d.value - A.diagonal()).abs() < 4.5 * sd)
    assert torch.all((d.std_error / sd - 1).abs() < 0.2)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_per_block_traces_add_up_and_match_exact_blocks(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    dense = H.to_dense()
    est = trace(H, 300, method=method, blocks="module", generator=torch.Generator().manual_seed(0))
    total = sum(float(b.value) for b in est.blocks.values())
    if method == "hutchinson":  # exactly the same samples, split by block
        assert abs(total - float(est.value)) < 1e-9
    for name, members in H.blocks().items():
        idx = torch.cat(
            [
                torch.arange(H.param_space.slice_of(p).start, H.param_space.slice_of(p).stop)
                for p in members
            ]
        )
        exact = float(dense[idx][:, idx].trace())
        b = est.blocks[name]
        assert abs(float(b.value) - exact) < 4.5 * float(b.std_error) + 1e-9


def test_symmetric_only():
    with pytest.raises(NotSymmetricError, match="symmetric"):
        trace(torch.triu(torch.ones(4, 4)), 3)
    with pytest.raises(NotSymmetricError):
        diagonal(torch.triu(torch.ones(4, 4)), 3)


def test_exact_ggn_diagonal_equals_the_hessian_diagonal_of_a_relu_network():
    from curvlab import GGNOperator

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32, 3),
    ).double()
    x, y = torch.randn(11, 16, dtype=torch.float64), torch.randint(0, 3, (11,))
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    G = GGNOperator(model, nn.CrossEntropyLoss(), batches)
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches)
    exact_G = G.to_dense().diagonal()
    exact_H = H.to_dense().diagonal()
    d = diagonal(G, method="exact")
    torch.testing.assert_close(d.value, exact_G, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(d.value, exact_H, rtol=1e-10, atol=1e-14)  # piecewise linear
    assert d.num_matvecs == 0
    tr = trace(G, method="exact", blocks="module")
    assert abs(float(tr.value) - float(exact_H.sum())) < 1e-10
    assert set(tr.blocks) == {"1", "4"}


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_exact_ggn_diagonal_for_regression_losses(loss):
    from curvlab import GGNOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randn(9, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss() if loss == "mse" else nn.BCEWithLogitsLoss()
    if loss == "bce":
        y = (y > 0).double()
    G = GGNOperator(model, loss_fn, (x, y))
    torch.testing.assert_close(G.exact_diagonal(), G.to_dense().diagonal(), rtol=1e-10, atol=1e-14)


def test_exact_diagonal_unavailable_for_the_hessian():
    with pytest.raises(ValueError, match="no exact diagonal"):
        torch.manual_seed(0)
        model = nn.Linear(3, 2).double()
        diagonal(
            HessianOperator(
                model,
                nn.MSELoss(),
                (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)),
            ),
            method="exact",
        )


@pytest.mark.parametrize("arch", ["tied", "conv1d", "layernorm"])
def test_exact_ggn_diagonal_on_the_layerwise_and_generic_paths(arch):
    from curvlab import GGNOperator
    from tests.operators.test_curvature_operators import Tied

    torch.manual_seed(0)
    if arch == "tied":  # a layer used twice: the generic (vmap) path
        model, d_in = Tied().double(), 5
    elif arch == "conv1d":
        model = nn.Sequential(
            nn.Unflatten(1, (2, 6)),
            nn.Conv1d(2, 3, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(9, 3),
        ).double()
        d_in = 12
    else:  # a LayerNorm parameter: not a Linear/Conv weight, generic path
        model, d_in = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double(), 5
    x, y = torch.randn(10, d_in, dtype=torch.float64), torch.randint(0, 3, (10,))
    G = GGNOperator(model, nn.CrossEntropyLoss(), [(x[:6], y[:6]), (x[6:], y[6:])])
    torch.testing.assert_close(G.exact_diagonal(), G.to_dense().diagonal(), rtol=1e-10, atol=1e-14)


def test_exact_diagonal_of_wrapped_operators():
    A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    M = random_psd(3)
    B = DenseOperator(M)
    cases = {
        "scaled": (2.0 * A, 12.0),
        "negated": (-A, -6.0),
        "sum": (A + B, 6.0 + float(M.trace())),
        "difference": (A - 2.0 * B, 6.0 - 2 * float(M.trace())),
        "transposed": (B.T, float(M.trace())),
        "counted": (CountingOperator(3.0 * A), 18.0),
    }
    for name, (op, want) in cases.items():
        got = trace(op, method="exact")
        assert abs(float(got.value) - want) < 1e-12, name
        assert got.num_matvecs == 0
        dense = op.to_dense().diagonal()
        torch.testing.assert_close(diagonal(op, method="exact").value, dense)


def test_exact_diagonal_of_a_scaled_ggn_and_refusals():
    from curvlab import GGNOperator
    from curvlab.errors import NoExactDiagonalError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    torch.testing.assert_close(
        diagonal(0.5 * G, method="exact").value, 0.5 * G.to_dense().diagonal()
    )
    A = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(NoExactDiagonalError, match="product A @ B"):
        (A @ A).exact_diagonal()
    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(NoExactDiagonalError, match="HessianOperator has no exact diagonal"):
        trace(2.0 * H, method="exact")


class _Root(nn.Module):
    """``x · sqrt(w²)`` at ``w = 0``: a finite loss whose gradient is 0/0 = NaN, so every product is."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(self.w**2)


def _nan_hessian() -> HessianOperator:
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    return HessianOperator(_Root(), nn.MSELoss(), (x, y))


@pytest.mark.parametrize(
    "estimate",
    [
        lambda H: trace(H, 5, method="hutchinson", chunk_size=1),
        lambda H: trace(H, 5, method="hutchinson", chunk_size=3),
        lambda H: eigsh(H, k=1),
    ],
    ids=["hutchinson-chunk1", "hutchinson-chunk3", "eigsh"],
)
def test_estimators_raise_the_operators_error_on_nan_products(estimate):
    # the products run unchecked inside these estimators; z^T A z (Lanczos: alpha) shows the
    # NaN and the operator's own check, run again on that product, raises its error
    H = _nan_hessian()
    with pytest.raises(NonFiniteError, match="a HessianOperator product contains NaN/inf"):
        estimate(H)
    assert not H._unchecked and H._fixed_depth == 0  # the block was left cleanly


def test_check_samples_recomputes_only_non_finite_chunks():
    A = CountingOperator(DenseOperator(torch.eye(3, dtype=torch.float64)))
    Z = torch.ones(2, 3, dtype=torch.float64)
    check_samples(A, Z, torch.tensor([3.0, 3.0], dtype=torch.float64))
    assert A.num_matvecs == 0  # finite samples: no product
    check_samples(A, Z, torch.tensor([3.0, math.inf], dtype=torch.float64))
    assert A.num_matvecs == 2  # an overflowing sum: the chunk is checked again, nothing raised
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        check_samples(_nan_hessian(), Z, torch.tensor([math.nan, 0.0], dtype=torch.float64))


def _small_hessian(unused: bool = False) -> HessianOperator:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
            self.unused = nn.Linear(2, 2) if unused else None  # parameters with no product

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)  # the layers' initialisation
    model = Net().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return HessianOperator(model, nn.CrossEntropyLoss(), (X, y))


@pytest.mark.parametrize("unused", [False, True])
def test_probe_quadratics_are_the_sums_of_the_probe_products(unused):
    # the Hessian's z^T H z from one dot per parameter tensor equals the dense quadratic form
    H = _small_hessian(unused)
    Z = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = H.to_dense()
    expected = torch.einsum("ci,ij,cj->c", Z, dense, Z)
    with H.fixed(check_products=False):
        fast = H._probe_quadratics(Z)
        products = H._probe_products(Z).sum(dim=1)
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(products, expected, rtol=1e-12, atol=1e-12)


def test_hutchinson_total_does_not_depend_on_asking_for_blocks():
    # with blocks the samples are sums of z ⊙ Hz, without them dots per parameter: the same
    # probes give the same total up to the order of the additions
    H = _small_hessian()
    plain = trace(
        H, 12, method="hutchinson", chunk_size=5, generator=torch.Generator().manual_seed(3)
    )
    blocks = trace(
        H, 12, method="hutchinson", chunk_size=5, blocks="module",
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    torch.testing.assert_close(plain.value, blocks.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain.std_error, blocks.std_error, rtol=1e-10, atol=1e-12)
    assert sum(float(e.value) for e in blocks.blocks.values()) == pytest.approx(float(plain.value))
