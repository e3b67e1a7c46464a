"""The graph cache across batches (chosen by size) and the fixed() block of estimators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.operators import GGNOperator, HessianOperator
from curvlab.operators import curvature as curvature_module
from tests.operators.test_curvature_operators import float64_default, make

__all__ = ["float64_default"]  # the module's autouse fixture: float64 by default here too


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_several_batches_are_cached_by_default_when_they_fit(cls):
    model, batches = make("mlp")
    op = cls(model, nn.CrossEntropyLoss(), batches)
    merged = cls is HessianOperator  # the Hessian concatenates the batches into one graph
    assert op.cache_graph and op._cache is not None
    assert len(op._cache) == (1 if merged else len(batches))
    kept = cls(model, nn.CrossEntropyLoss(), batches, cache_graph=True)
    assert kept._cache is not None and len(kept._cache) == len(batches)
    fresh = cls(model, nn.CrossEntropyLoss(), batches, cache_graph=False)
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=op.dtype)
    torch.testing.assert_close(op @ V, fresh @ V, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(kept @ V, fresh @ V, rtol=1e-12, atol=1e-13)


def test_merged_batches_keep_masked_and_class_weighted_means_exact():
    model, batches = make("mlp", sizes=(6, 5, 4))
    batches[1][1][:3] = -100  # ignore_index in one batch: the batch weights are uneven
    loss = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0]))
    H = HessianOperator(model, loss, batches)
    assert len(H._cache) == 1
    ref = HessianOperator(model, loss, batches, cache_graph=False)
    torch.testing.assert_close(H.to_dense(), ref.to_dense(), rtol=1e-10, atol=1e-12)


def test_batches_whose_graphs_do_not_fit_are_not_cached(monkeypatch):
    monkeypatch.setattr(curvature_module, "GRAPH_CACHE_BYTES", 0)
    model, batches = make("mlp")
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches)
    assert not H.cache_graph and H._cache is None
    single = HessianOperator(model, nn.CrossEntropyLoss(), batches[0])
    assert single.cache_graph  # one batch is always cached


def test_a_dataloader_of_eight_batches_is_cached_and_exact():
    model, batches = make("mlp", sizes=(64,))
    x, y = batches[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    H = HessianOperator(model, nn.CrossEntropyLoss(), loader)
    assert H.cache_graph
    ref = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    torch.testing.assert_close(H.to_dense(), ref.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cache_graph", [True, False])
def test_fixed_checks_once_and_follows_a_change_after_the_block(cache_graph):
    model, batches = make("mlp", sizes=(9,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0], cache_graph=cache_graph)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=H.dtype)
    with H.fixed():
        key_before = H._cache_key  # the check ran once, on entry
        inside = H @ v
        with torch.no_grad():
            model[0].weight.mul_(1.5)
        assert H._cache_key == key_before  # no check inside the block
    after = H @ v  # the first product after the block sees the change
    fresh = HessianOperator(model, nn.CrossEntropyLoss(), batches[0], cache_graph=False) @ v
    torch.testing.assert_close(after, fresh, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(inside, after)


def test_composite_operators_pass_fixed_on():
    model, batches = make("mlp", sizes=(9,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0])
    A = 2.0 * H + H.T
    with A.fixed():
        assert H._fixed_depth == 2  # the sum's parts: the scaled H and H.T (H itself)
    assert H._fixed_depth == 0


def test_fixed_without_product_checks_and_a_nested_block_that_checks_again():
    from curvlab.errors import NonFiniteError

    model, batches = make("mlp", sizes=(9,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0])
    v = torch.zeros(H.shape[0], dtype=H.dtype)
    v[0] = float("inf")
    with H.fixed(check_products=False):
        assert not bool(torch.isfinite(H @ v).all())  # the caller checks: nothing raised
        with pytest.raises(NonFiniteError, match="product contains NaN/inf"), H.fixed():
            H @ v  # a nested block with the default checks again
        assert not bool(torch.isfinite(H @ v).all())  # and the outer block's setting is back
    with pytest.raises(NonFiniteError, match="product contains NaN/inf"):
        H @ v


def test_hessian_probe_products_fused_when_unchecked_equal_the_generic_ones(monkeypatch):
    from curvlab.operators.base import LinearOperator

    model, batches = make("mlp", sizes=(9,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0])
    Z = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(1), dtype=H.dtype)
    generic = LinearOperator._probe_products
    calls: list[int] = []
    monkeypatch.setattr(
        LinearOperator, "_probe_products", lambda op, rows: calls.append(1) or generic(op, rows)
    )
    with H.fixed(check_products=False):
        fused = H._probe_products(Z)  # one graph, no check to run: z ⊙ Hz from the pieces
    assert calls == []
    assert torch.equal(fused, Z * (H @ Z.T).T)
    assert torch.equal(H._probe_products(Z), fused) and calls == [1]  # checked: the generic path
