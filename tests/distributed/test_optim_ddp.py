"""Sophia (G and H) and AdaHessian under DistributedDataParallel on two gloo ranks follow the
trajectory of one process on the concatenated batches (float64, to 1e-10)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from curvlab.errors import ArgumentTypeError, DistributedError, InvalidArgumentError
from curvlab.optim import AdaHessian, Sophia
from tests.distributed._gloo import needs_gloo, two_rank_results

STEPS = 5

#: name -> (optimizer factory, loss of (outputs, targets), framework-loop contract)
CASES: dict[str, tuple[Callable[[Any], Any], Callable[..., Any], bool]] = {
    "sophia-g": (
        lambda p: Sophia(p, lr=0.05, rho=0.5, update_period=2, seed=3),
        F.cross_entropy,
        False,
    ),
    "sophia-g-gaussian": (
        lambda p: Sophia(p, lr=0.05, likelihood="gaussian", update_period=2, seed=4),
        lambda out, y: (
            0.5 * F.mse_loss(out, F.one_hot(y, 3).to(out.dtype), reduction="sum") / out.shape[0]
        ),
        False,
    ),
    "sophia-h": (
        lambda p: Sophia(p, lr=0.05, rho=0.5, estimator="hutchinson", update_period=2, seed=5),
        F.cross_entropy,
        False,
    ),
    "adahessian": (lambda p: AdaHessian(p, lr=0.1, seed=6), F.cross_entropy, False),
    "adahessian-framework-loop": (lambda p: AdaHessian(p, lr=0.1, seed=6), F.cross_entropy, True),
    "sophia-g-framework-loop": (
        lambda p: Sophia(p, lr=0.05, rho=0.5, update_period=2, seed=3),
        F.cross_entropy,
        True,
    ),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(10, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (10,), generator=g),
        )
        for _ in range(STEPS)
    ]


def _train(name: str, model: nn.Module, shard: slice, ddp: DistributedDataParallel | None):
    make, loss_fn, framework = CASES[name]
    opt = make(model.parameters())
    if ddp is not None:
        opt.data_parallel(ddp)
    if framework:
        opt.expect_external_curvature("the test loop")
    losses = []
    for x, y in _batches():
        x, y = x[shard], y[shard]
        if framework:  # the loop back-propagates through DDP, which averages the gradients
            logits = (ddp or model)(x)
            loss = loss_fn(logits, y)
            if opt.curvature_due():
                opt.estimate_curvature(loss, logits)
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:

            def closure(x=x, y=y):
                logits = model(x)  # the unwrapped module: DDP has no double backward
                return loss_fn(logits, y), logits

            loss = opt.step(closure)
        losses.append(float(loss.detach()))
    return [p.detach().clone() for p in model.parameters()], losses


def _error(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except (DistributedError, InvalidArgumentError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _on_rank(rank: int) -> dict[str, Any]:
    shard = slice(5 * rank, 5 * rank + 5)
    out: dict[str, Any] = {}
    for name in CASES:
        model = _model()
        out[name] = _train(name, model, shard, DistributedDataParallel(model))
    model = _model()
    ddp = DistributedDataParallel(model)
    out["seed"] = _error(lambda: Sophia(model.parameters(), seed=rank).data_parallel(ddp))
    out["hyper"] = _error(lambda: AdaHessian(model.parameters(), lr=rank + 1.0).data_parallel(ddp))
    with torch.no_grad():
        model[0].bias.add_(float(rank))  # ranks now hold different parameters
    out["params"] = _error(lambda: Sophia(model.parameters(), seed=0).data_parallel(ddp))
    out["foreign"] = _error(lambda: Sophia(_model().parameters(), seed=0).data_parallel(ddp))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_rank_results(_on_rank, tmp_path_factory.mktemp("ddp"))


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("name", list(CASES))
def test_ddp_trajectory_equals_one_process_on_the_union(ranks, name):
    ref_params, ref_losses = _train(name, _model(), slice(None), None)
    for got in ranks:
        params, losses = got[name]
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        if not CASES[name][2]:  # the closure contract returns the union's loss
            torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=0)
    moved = sum(
        float((p - q.detach()).abs().sum()) for p, q in zip(ref_params, _model().parameters())
    )
    assert moved > 1e-2  # the runs did train


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("seed", "DistributedError: the ranks disagree on the seed"),
        ("params", "DistributedError: the ranks disagree on the model's parameters"),
        ("hyper", "DistributedError: the ranks disagree on AdaHessian's hyper-parameters"),
        ("foreign", "InvalidArgumentError: Sophia.data_parallel(model): the optimizer has"),
    ],
)
def test_ranks_that_disagree_raise(ranks, case, fragment):
    for got in ranks:
        assert got[case].startswith(fragment), got[case]


def test_data_parallel_needs_an_initialised_process_group():
    opt = Sophia(_model().parameters(), seed=0)
    with pytest.raises(DistributedError, match=r"before Sophia\.data_parallel\(\)"):
        opt.data_parallel()


@needs_gloo
def test_data_parallel_takes_a_module(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        opt = AdaHessian(_model().parameters(), seed=0)
        with pytest.raises(ArgumentTypeError, match="takes the DistributedDataParallel model"):
            opt.data_parallel("ddp")
    finally:
        dist.destroy_process_group()
