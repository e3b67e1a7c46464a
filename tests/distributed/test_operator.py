"""DistributedOperator on two CPU processes (gloo) equals the operator on the union of the shards."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from curvlab import GGNOperator, HessianOperator, eigsh, trace
from curvlab.distributed import DistributedOperator
from curvlab.errors import CurvlabError


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    y[[1, 2, 9]] = -100  # ignored targets, unevenly spread over the two shards
    return x, y


def _loss():
    return nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _data()
        shard = slice(0, 8) if rank == 0 else slice(8, 13)  # unequal shards: 8 and 5 examples
        H = DistributedOperator(HessianOperator(_model(), _loss(), (x[shard], y[shard])))
        dense = H.to_dense()
        top = eigsh(H, k=2, tol=1e-10, generator=torch.Generator().manual_seed(0))
        loss, grad = H.loss_and_gradient()
        G = DistributedOperator(GGNOperator(_model(), _loss(), (x[shard], y[shard])))
        torch.save(
            {
                "dense": dense,
                "top": top.values,
                "loss": loss,
                "grad": grad,
                "ggn_diag": G.exact_diagonal(),
                "ggn_trace": trace(2.0 * G, method="exact").value,
            },
            os.path.join(out_dir, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo"
)
def test_two_ranks_equal_the_union_of_their_shards(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, y = _data()
    full = HessianOperator(_model(), _loss(), (x, y))
    ref = full.to_dense()
    ref_loss, ref_grad = full.loss_and_gradient()
    ggn_diag = GGNOperator(_model(), _loss(), (x, y)).to_dense().diagonal()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["dense"], ref)
        torch.testing.assert_close(
            got["top"], torch.linalg.eigvalsh(ref).flip(0)[:2], rtol=1e-8, atol=1e-12
        )
        assert abs(got["loss"] - ref_loss) < 1e-12
        torch.testing.assert_close(got["grad"], ref_grad)
        torch.testing.assert_close(got["ggn_diag"], ggn_diag, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got["ggn_trace"], 2.0 * ggn_diag.sum(), rtol=1e-10, atol=1e-14)


def test_needs_an_initialised_process_group():
    x, y = _data()
    with pytest.raises(CurvlabError, match="init_process_group"):
        DistributedOperator(HessianOperator(_model(), nn.CrossEntropyLoss(), (x, y)))
