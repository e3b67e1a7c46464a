"""The scratch buffer: right shape/dtype, reused, grown, and never saved with the optimizer."""

from __future__ import annotations

import copy

import torch

from curvlab.optim._scratch import chunks, workspace, workspace_views
from curvlab.optim.frugal import FRUGAL


def test_workspace_is_reused_grown_and_not_pickled() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FRUGAL([p])
    a = workspace(opt, torch.zeros(2, 3))
    assert a.shape == (2, 3) and a.dtype == torch.float32
    assert workspace(opt, torch.zeros(6)).data_ptr() == a.data_ptr()  # same buffer
    big = workspace(opt, torch.zeros(10, dtype=torch.float32))
    assert big.numel() == 10
    assert workspace(opt, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    clone = copy.deepcopy(opt)
    assert "_workspace" not in clone.__dict__ and "_workspace_views" not in clone.__dict__


def test_views_share_the_buffer_of_workspace_and_chunks_bound_it() -> None:
    class Holder: ...

    h = Holder()
    views = workspace_views(h, [torch.zeros(2, 2), torch.zeros(3)])
    assert [v.shape for v in views] == [(2, 2), (3,)]
    assert views[1].data_ptr() == views[0].data_ptr() + 4 * 4  # consecutive
    assert workspace(h, torch.zeros(7)).data_ptr() == views[0].data_ptr()  # one buffer
    assert chunks([5, 5, 5], cap=10) == [[0, 1], [2]]
    assert chunks([20, 1], cap=10) == [[0], [1]]  # a tensor larger than the cap stands alone
