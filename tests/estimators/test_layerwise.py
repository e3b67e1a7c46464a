from __future__ import annotations

import torch
from torch import nn

from curvlab import HessianOperator, layer_sensitivity


def test_layer_sensitivity_against_exact_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    res = layer_sensitivity(
        model,
        nn.CrossEntropyLoss(),
        (x, y),
        num_matvecs=400,
        generator=torch.Generator().manual_seed(0),
    )
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    dense = H.to_dense()
    assert res.names == ("0", "2")
    assert res.num_params == (30, 21)
    for i, (_name, members) in enumerate(H.blocks().items()):
        idx = torch.cat(
            [
                torch.arange(H.param_space.slice_of(p).start, H.param_space.slice_of(p).stop)
                for p in members
            ]
        )
        block = dense[idx][:, idx]
        assert abs(res.trace[i] - float(block.trace())) < 4.5 * res.trace_std_error[i]
        top = float(torch.linalg.eigvalsh(block)[-1])
        assert abs(res.top_eigenvalue[i] - top) <= 1e-3 * abs(top)
        assert res.sensitivity[i] == res.trace[i] / res.num_params[i]
    text = res.table()
    assert "trace/n" in text and "0" in text
    assert res.rows()[1]["block"] == "2"


def test_exact_per_layer_traces_of_a_relu_network_from_the_ggn():
    from curvlab import GGNOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    G = GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    res = layer_sensitivity(
        model, nn.CrossEntropyLoss(), (x, y), operator=G, method="exact", top_eigenvalue=False
    )
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    assert abs(res.trace[0] - float(H.diagonal()[:30].sum())) < 1e-12
    assert abs(res.trace[1] - float(H.diagonal()[30:].sum())) < 1e-12
    assert res.trace_std_error == (0.0, 0.0)
