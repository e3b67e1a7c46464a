"""curvlab.compress: OBS pruning against a dense float64 OBS, magnitude pruning, bit allocation."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from curvlab.compress import (
    _block_inverse,
    _example_grads,
    fake_quantize,
    prune,
    quantization_perturbation,
    quantize,
)
from curvlab.errors import InvalidArgumentError, UnknownOptionError
from curvlab.estimators.results import LayerSensitivity

DT = torch.float64


def _net(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    return net, torch.randn(24, 3, dtype=DT), torch.randint(0, 2, (24,))


def test_mfac_woodbury_block_inverse_equals_the_dense_one():
    G = torch.randn(10, 16, dtype=DT)
    F = 1e-2 * torch.eye(16, dtype=DT) + G.T @ G / 10
    for fisher in ("mfac", "empirical"):
        assert torch.allclose(_block_inverse(G, 1e-2, fisher), torch.linalg.inv(F), rtol=1e-9)


def test_per_example_gradients_match_autograd():
    net, x, y = _net()
    G = _example_grads(net, nn.functional.cross_entropy, (x, y), ["0.weight", "2.weight"], 5)
    for i in range(5):
        net.zero_grad()
        nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        ref = torch.cat([net[0].weight.grad.reshape(-1), net[2].weight.grad.reshape(-1)])
        assert torch.allclose(G[i], ref, atol=1e-12)


def test_one_shot_obs_equals_dense_obs():
    # one level, one block per layer: remove the k least salient weights jointly (Hassibi & Stork)
    net, x, y = _net(1)
    ref_net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    ref_net.load_state_dict(net.state_dict())
    names = ["0.weight", "2.weight"]
    G = _example_grads(net, nn.functional.cross_entropy, (x, y), names, 24)
    w = torch.cat([net[0].weight.detach().reshape(-1), net[2].weight.detach().reshape(-1)])
    finv = []
    for a, b in ((0, 12), (12, 20)):
        F = 1e-3 * torch.eye(b - a, dtype=DT) + G[:, a:b].T @ G[:, a:b] / 24
        finv.append(torch.linalg.inv(F))
    diag = torch.cat([f.diagonal() for f in finv])
    k = 10
    removed = torch.zeros(20, dtype=torch.bool)
    removed[torch.argsort(w**2 / (2 * diag))[:k]] = True
    expect = w.clone()
    for (a, b), f in zip(((0, 12), (12, 20)), finv):
        q = removed[a:b].nonzero().flatten()
        expect[a:b] -= f[:, q] @ torch.linalg.solve(f[q][:, q], w[a:b][q])
    expect[removed] = 0
    res = prune(net, nn.functional.cross_entropy, (x, y), k / 20, blocks=12, num_grads=24,
                damp=1e-3, steps=1)  # fmt: skip
    got = torch.cat([net[0].weight.detach().reshape(-1), net[2].weight.detach().reshape(-1)])
    assert torch.allclose(got, expect, atol=1e-10)
    assert res.model is net and sum(int((~m).sum()) for m in res.masks.values()) == k


def test_magnitude_pruning_is_global():
    net, _, _ = _net(2)
    w = torch.cat([p.detach().abs().reshape(-1) for p in (net[0].weight, net[2].weight)])
    res = prune(net, None, None, 0.25, method="magnitude")
    kept = torch.cat([m.reshape(-1) for m in res.masks.values()])
    assert int((~kept).sum()) == 5
    assert float(w[~kept].max()) <= float(w[kept].min())
    assert float(net[0].bias.detach().abs().sum()) > 0  # biases untouched


def test_quantize_and_fake_quantize():
    w = torch.tensor([0.9, -0.31, 0.2, 0.0], dtype=DT)
    q = quantize(w, 3)  # 3 levels each side: step 0.3
    assert torch.allclose(q, torch.tensor([0.9, -0.3, 0.3, 0.0], dtype=DT))
    net = _net(3)[0]
    before = net[0].weight.detach().clone()
    fq = fake_quantize(net, {"0": 2})
    assert torch.equal(net[0].weight, before)  # original untouched
    assert fq[0].weight.unique().numel() <= 3
    pert = quantization_perturbation(net, ["0", "2"], (2, 8))
    assert pert["0"][2] > pert["0"][8] > 0


def _sens(traces, tops, sizes):
    names = tuple(f"l{i}" for i in range(len(sizes)))
    return LayerSensitivity(names, tuple(sizes), tuple(traces), (0.0,) * len(sizes), tuple(tops), 0)


def test_allocate_bits_is_the_exact_optimum_under_the_budget():
    sizes, choices = (10, 40, 25, 5), (2, 4, 8)
    sens = _sens((30.0, 2.0, 10.0, 50.0), (1.0,) * 4, sizes)
    pert = {f"l{i}": {2: 1.0 * (i + 1), 4: 0.1 * (i + 1), 8: 0.001 * (i + 1)} for i in range(4)}
    for budget in (2.0, 3.5, 4.0, 6.0, 8.0):
        got = sens.allocate_bits(budget, choices, perturbation=pert)
        best = None
        for cfg in itertools.product(choices, repeat=4):  # brute force over 81 configurations
            if sum(n * b for n, b in zip(sizes, cfg)) > budget * sum(sizes):
                continue
            cost = sum(s * pert[f"l{i}"][b] for i, (s, b) in enumerate(zip(sens.sensitivity, cfg)))
            if best is None or cost < best[0]:
                best = (cost, cfg)
        assert tuple(got.values()) == best[1], budget
    by_top = sens.allocate_bits(4.0, choices, perturbation=pert, by="top_eigenvalue")
    assert set(by_top.values()) <= set(choices)


BAD = [
    (lambda: prune(_net()[0], None, None, 1.0, method="magnitude"),
     InvalidArgumentError, r"sparsity must be in \[0, 1\)"),
    (lambda: prune(_net()[0], None, None, -0.1), InvalidArgumentError, "sparsity must be in"),
    (lambda: prune(_net()[0], None, None, 0.5, method="random"),
     UnknownOptionError, "method must be 'obs' or 'magnitude'"),
    (lambda: prune(_net()[0], None, None, 0.5, fisher="kfac"),
     UnknownOptionError, "fisher must be 'mfac' or 'empirical'"),
    (lambda: prune(_net()[0], None, None, 0.5, damp=0.0), InvalidArgumentError, "damp must be"),
    (lambda: prune(nn.ReLU(), None, None, 0.5), InvalidArgumentError, "no Linear or Conv layer"),
    (lambda: _sens((1.0,), (1.0,), (4,)).allocate_bits(1.5, perturbation={"l0": {2: 1.0}}),
     InvalidArgumentError, "bit budget 1.5 bits per parameter is below the smallest choice 2"),
    (lambda: _sens((1.0,), (1.0,), (4,)).allocate_bits(4, perturbation={}),
     InvalidArgumentError, "perturbation has no entry"),
    (lambda: _sens((1.0,), (float("nan"),), (4,)).allocate_bits(
        4, perturbation={"l0": {2: 1.0, 4: 0.1, 8: 0.0}}, by="top_eigenvalue"),
     InvalidArgumentError, "top eigenvalues were not computed"),
    (lambda: _sens((1.0,), (1.0,), (4,)).allocate_bits(4, perturbation={}, by="mean"),
     UnknownOptionError, "by must be 'trace' or 'top_eigenvalue'"),
    (lambda: quantize(torch.ones(2), 1), InvalidArgumentError, "bits must be an integer >= 2"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "exc", "fragment"), BAD)
def test_bad_input(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()
