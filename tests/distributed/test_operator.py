"""DistributedOperator on two CPU processes (gloo) equals the operator on the union of the shards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab import GGNOperator, HessianOperator, eigsh, trace
from curvlab.distributed import DistributedOperator
from curvlab.errors import CurvlabError
from tests.distributed._gloo import needs_gloo, two_rank_results
from tests.distributed._gloo import tiny_data as _data
from tests.distributed._gloo import tiny_loss as _loss
from tests.distributed._gloo import tiny_model as _model


def _on_rank(rank: int) -> dict:
    x, y = _data()
    shard = slice(0, 8) if rank == 0 else slice(8, 13)  # unequal shards: 8 and 5 examples
    H = DistributedOperator(HessianOperator(_model(), _loss(), (x[shard], y[shard])))
    top = eigsh(H, k=2, tol=1e-10, generator=torch.Generator().manual_seed(0))
    loss, grad = H.loss_and_gradient()
    G = DistributedOperator(GGNOperator(_model(), _loss(), (x[shard], y[shard])))
    return {
        "dense": H.to_dense(),
        "top": top.values,
        "loss": loss,
        "grad": grad,
        "ggn_diag": G.exact_diagonal(),
        "ggn_trace": trace(2.0 * G, method="exact").value,
    }


@pytest.mark.slow
@needs_gloo
def test_two_ranks_equal_the_union_of_their_shards(tmp_path):
    results = two_rank_results(_on_rank, tmp_path)
    x, y = _data()
    full = HessianOperator(_model(), _loss(), (x, y))
    ref = full.to_dense()
    ref_loss, ref_grad = full.loss_and_gradient()
    ggn_diag = GGNOperator(_model(), _loss(), (x, y)).to_dense().diagonal()
    for got in results:
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
