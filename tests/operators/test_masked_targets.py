"""Operators built from several batches equal the operator of the concatenated batch when the loss
divides by something other than the number of targets: ignore_index, class weights, padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from tests.reference.dense import (
    dense_empirical_fisher_of_loss,
    dense_ggn_of_loss,
    dense_hessian,
)


class Sequence(nn.Module):
    """Per-token logits ``[N, C, T]`` of a tiny sequence model (targets ``[N, T]``, padded)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x))).transpose(1, 2)


def classifier(log_softmax: bool = False) -> nn.Module:
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers, nn.LogSoftmax(dim=1)) if log_softmax else nn.Sequential(*layers)


def masked_batches(sequence: bool = False):
    """Three unequal batches; some targets ignored (-100), every target of the last one ignored."""
    g = torch.Generator().manual_seed(0)
    sizes = (7, 5, 3)
    n = sum(sizes)
    if sequence:
        x = torch.randn(n, 6, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n, 6), generator=g)
        lengths = torch.randint(1, 7, (n,), generator=g)
        y[torch.arange(6)[None, :] >= lengths[:, None]] = -100  # padding after each length
    else:
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        y[torch.rand(n, generator=g) < 0.4] = -100
    y[n - sizes[-1] :] = -100
    batches = list(zip(x.split(sizes), y.split(sizes)))
    return batches, (x, y)


LOSSES = {
    "ignore_index": lambda: nn.CrossEntropyLoss(),
    "class_weight": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.3, 2.0, 1.1], dtype=torch.float64)
    ),
    "custom_ignore_index": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.3, 2.0, 1.1], dtype=torch.float64), ignore_index=1
    ),
}


def setup(loss_name: str, sequence: bool = False):
    torch.manual_seed(0)
    model = (Sequence() if sequence else classifier()).double()
    loss_fn = LOSSES[loss_name]()
    batches, (x, y) = masked_batches(sequence)
    if loss_fn.ignore_index != -100:  # the masked targets carry the loss's own ignore_index
        y = torch.where(y == -100, loss_fn.ignore_index, y)
        batches = list(zip(x.split([7, 5, 3]), y.split([7, 5, 3])))
    return model, loss_fn, batches, (x, y)


def assert_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert float((got - want).norm() / want.norm()) < 1e-10


@pytest.mark.parametrize("sequence", [False, True], ids=["classes", "padded-sequence"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_hessian_of_batches_equals_the_concatenated_batch(loss_name, sequence):
    model, loss_fn, batches, full = setup(loss_name, sequence)
    names = [n for n, _ in model.named_parameters()]
    want = dense_hessian(model, loss_fn, [full], names)
    assert_equal(HessianOperator(model, loss_fn, batches).to_dense(), want)
    assert_equal(HessianOperator(model, loss_fn, full).to_dense(), want)


@pytest.mark.parametrize("sequence", [False, True], ids=["classes", "padded-sequence"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_ggn_and_empirical_fisher_of_batches_equal_the_concatenated_batch(loss_name, sequence):
    model, loss_fn, batches, (x, y) = setup(loss_name, sequence)
    names = [n for n, _ in model.named_parameters()]
    model.eval()
    ggn = dense_ggn_of_loss(model, loss_fn, x, y, names)
    ef = dense_empirical_fisher_of_loss(model, loss_fn, x, y, names)
    for data in (batches, (x, y)):
        assert_equal(GGNOperator(model, loss_fn, data).to_dense(), ggn)
        assert_equal(EmpiricalFisherOperator(model, loss_fn, data).to_dense(), ef)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_exact_ggn_diagonal_and_estimators_see_the_weights(loss_name):
    model, loss_fn, batches, (x, y) = setup(loss_name)
    names = [n for n, _ in model.named_parameters()]
    ggn = dense_ggn_of_loss(model, loss_fn, x, y, names)
    G = GGNOperator(model, loss_fn, batches)
    assert_equal(G.exact_diagonal(), ggn.diagonal())  # Linear layers: the hook path
    assert_equal(G._vmap_exact_diagonal(4), ggn.diagonal())  # the generic path
    assert_equal(cl.trace(G, method="exact").value, ggn.trace())
    top = cl.eigsh(G, k=1, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert abs(float(top.values[0]) / float(torch.linalg.eigvalsh(ggn)[-1]) - 1) < 1e-10


def test_nll_loss_with_ignore_index_and_class_weights():
    torch.manual_seed(0)
    model = classifier(log_softmax=True).double()
    batches, full = masked_batches()
    loss_fn = nn.NLLLoss(weight=torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64))
    names = [n for n, _ in model.named_parameters()]
    want = dense_hessian(model, loss_fn, [full], names)
    assert_equal(HessianOperator(model, loss_fn, batches).to_dense(), want)


def test_functional_cross_entropy_ignores_minus_100():
    torch.manual_seed(0)
    model = classifier().double()
    batches, full = masked_batches()
    loss_fn = nn.functional.cross_entropy
    names = [n for n, _ in model.named_parameters()]
    want = dense_hessian(model, loss_fn, [full], names)
    assert_equal(HessianOperator(model, loss_fn, batches).to_dense(), want)


def test_fisher_ignores_masked_targets():
    model, loss_fn, batches, (x, y) = setup("class_weight")
    names = [n for n, _ in model.named_parameters()]

    def fisher(data, m=1):
        gen = torch.Generator().manual_seed(3)
        return FisherOperator(model, loss_fn, data, mc_samples=m, generator=gen).to_dense()

    # the inputs of ignored examples do not matter: same draws, same matrix
    moved = [(xb + 5.0 * (yb == loss_fn.ignore_index)[:, None], yb) for xb, yb in batches]
    torch.testing.assert_close(fisher(moved), fisher(batches), rtol=1e-12, atol=1e-14)
    # and its expectation is the weighted, masked GGN
    ggn = dense_ggn_of_loss(model.eval(), loss_fn, x, y, names)
    assert float((fisher(batches, 4096) - ggn).norm() / ggn.norm()) < 0.05


def test_every_target_ignored_is_refused():
    torch.manual_seed(0)
    model = classifier().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.full((4,), -100)
    with pytest.raises(cl.EmptyDataError, match="every target is ignored"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
