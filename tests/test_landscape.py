"""Loss landscapes against closed forms: parabolic slices, filter norms, convex and scalar barriers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.errors import InvalidArgumentError, ShapeMismatchError, UnknownOptionError
from curvlab.landscape import barrier, interpolate, random_direction, slice_1d, slice_2d

DT = torch.float64


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


def _regression(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(5, 3, dtype=DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    x = torch.randn(40, 5, generator=gen, dtype=DT)
    y = torch.randn(40, 3, generator=gen, dtype=DT)
    return model, x, y


def _flat(model: nn.Linear, state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1) for n, _ in model.named_parameters()])


def test_slice_of_a_quadratic_is_its_exact_parabola() -> None:
    # L(θ + a d) = L(θ) + a gᵀd + a²/2 dᵀHd for a linear model under MSE
    model, x, y = _regression()
    res = slice_1d(model, _mse, (x, y), span=(-2.0, 2.0), num=9, keep_vectors=True)
    d = _flat(model, res.directions[0])
    params = list(model.parameters())
    loss = _mse(model(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    hd = torch.autograd.grad(g @ d, params)
    curv = float(torch.cat([t.reshape(-1) for t in hd]) @ d)
    loss = loss.detach()
    for a, value in zip(res.xs, res.losses):
        assert value == pytest.approx(
            float(loss) + a * float((g @ d).detach()) + a * a / 2 * curv, rel=1e-10
        )


def test_filter_normalised_direction_matches_weight_filter_norms() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    d = random_direction(conv, generator=torch.Generator().manual_seed(1))
    w = conv[0].weight.detach()
    assert torch.allclose(d["0.weight"].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))
    assert torch.allclose(d["3.weight"].norm(dim=1), conv[3].weight.detach().norm(dim=1))
    for name in ("0.bias", "1.weight", "1.bias", "3.bias"):
        assert not d[name].any()  # vectors zeroed by default
    kept = random_direction(conv, keep_vectors=True, generator=torch.Generator().manual_seed(1))
    assert float(kept["3.bias"].norm()) == pytest.approx(float(conv[3].bias.detach().norm()))
    layer = random_direction(conv, "layer", generator=torch.Generator().manual_seed(1))
    assert float(layer["3.weight"].norm()) == pytest.approx(float(conv[3].weight.detach().norm()))


def test_barrier_of_a_convex_problem_is_zero_whole_and_layerwise() -> None:
    a, x, y = _regression(0)
    b, _, _ = _regression(1)
    res = interpolate(a, b, _mse, (x, y), num=11, layerwise=True)
    assert res.barrier == pytest.approx(0.0, abs=1e-12)
    assert res.losses[0] == pytest.approx(float(_mse(a(x), y).detach()))
    assert res.losses[-1] == pytest.approx(float(_mse(b(x), y).detach()))
    assert res.layer_barriers == pytest.approx({"": 0.0}, abs=1e-12)  # the root owns both


class _Scalar(nn.Module):
    def __init__(self, u: float, v: float) -> None:
        super().__init__()
        self.first = nn.Linear(1, 1, bias=False, dtype=DT)
        self.second = nn.Linear(1, 1, bias=False, dtype=DT)
        with torch.no_grad():
            self.first.weight.fill_(u)
            self.second.weight.fill_(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_barrier_of_the_scalar_net_between_sign_flipped_minima() -> None:
    # f = u v x, target x: (1, 1) and (−1, −1) are minima; along the line u = v = 1 − 2α the loss is
    # ((1 − 2α)² − 1)²/2, 1/2 at α = 1/2; one layer alone: ((1 − 2α) − 1)²/2, chord 2α, barrier 0
    x = torch.ones(1, 1, dtype=DT)
    res = interpolate(_Scalar(1, 1), _Scalar(-1, -1), _mse, (x, x), num=5, layerwise=True)
    assert res.barrier == pytest.approx(0.5)
    assert res.losses[1] == pytest.approx(((0.5**2) - 1) ** 2 / 2)
    assert res.layer_barriers == pytest.approx({"first": 0.0, "second": 0.0})
    assert res.layer_losses["first"][-1] == pytest.approx(2.0)


def test_slice_2d_grid_and_given_direction() -> None:
    model, x, y = _regression()
    res = slice_2d(model, _mse, [(x[:20], y[:20]), (x[20:], y[20:])], num=3)
    assert len(res.losses) == 3 and len(res.losses[0]) == 3
    assert res.losses[1][1] == pytest.approx(float(_mse(model(x), y).detach()))
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    flat = slice_1d(model, _mse, (x, y), direction=zero, num=3)
    assert max(flat.losses) - min(flat.losses) == 0.0
    assert barrier([1.0, 0.0, 1.0]) == 0.0


def test_bad_inputs() -> None:
    model, x, y = _regression()
    with pytest.raises(ShapeMismatchError, match="same state-dict names"):
        interpolate(model, nn.Linear(5, 2, dtype=DT), _mse, (x, y))
    with pytest.raises(InvalidArgumentError, match="num must be an integer >= 2"):
        interpolate(model, model, _mse, (x, y), num=1)
    with pytest.raises(InvalidArgumentError, match="data is empty"):
        interpolate(model, model, _mse, [])
    with pytest.raises(UnknownOptionError, match="unknown normalization 'filters'"):
        slice_1d(model, _mse, (x, y), normalization="filters")
    with pytest.raises(ShapeMismatchError, match="a direction must map every parameter"):
        slice_1d(model, _mse, (x, y), direction={"weight": torch.zeros(3, 5)})
    with pytest.raises(InvalidArgumentError, match="span must be"):
        slice_1d(model, _mse, (x, y), span=(1.0, -1.0))
