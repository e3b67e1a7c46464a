"""GFSSharpness against the closed-form gradient-flow limit of a scalar network."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.errors import InvalidArgumentError
from curvlab.monitors import GFSSharpness, attach

F64 = torch.float64


class ScalarNet(nn.Module):
    """f(x) = (∏ wᵢ)·x."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.prod() * x


def half_square(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum()


def closed_form_gfs(w0: list[float]) -> float:
    # gradient flow conserves wᵢ² − wⱼ²: at the limit wᵢ² = wᵢ(0)² + c with ∏|wᵢ| = 1 (signs
    # kept, ∏ wᵢ(0) > 0), and there H = ∇f∇fᵀ, so λ_max = Σᵢ ∏_{j≠i} wⱼ² = Σᵢ 1/wᵢ²
    lo, hi = -min(v * v for v in w0), 10.0
    for _ in range(200):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if math.prod(v * v + c for v in w0) < 1 else (lo, c)
    return sum(1 / (v * v + c) for v in w0)


@pytest.mark.parametrize("w0", [[0.5, 1.5, 0.8], [1.8, 0.4], [0.3, 0.9, 1.2, 1.1]])
def test_matches_the_conservation_law_limit(w0):
    model = ScalarNet(w0)
    x = torch.ones(1, dtype=F64)
    mon = GFSSharpness(model, half_square, (x, x), every=1)
    handle = attach(torch.optim.SGD(model.parameters(), lr=0.1), mon)
    values = handle.check_now()
    assert values["gfs/converged"] == 1.0
    assert values["gfs/value"] == pytest.approx(closed_form_gfs(w0), rel=1e-4)
    # the model itself is not moved; the iterate's sharpness is the dense Hessian's
    assert model.w.tolist() == w0
    dense = torch.func.hessian(lambda w: 0.5 * (w.prod() - 1) ** 2)(torch.tensor(w0, dtype=F64))
    assert values["gfs/iterate_sharpness"] == pytest.approx(
        float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flow_step": 0.0}, "flow_step must be in"),
        ({"grad_tol": -1.0}, "grad_tol and tol must be > 0"),
        ({"max_flow_steps": 0}, "max_flow_steps must be an integer"),
    ],
)
def test_bad_inputs(kwargs, match):
    x = torch.ones(1, dtype=F64)
    with pytest.raises(InvalidArgumentError, match=match):
        GFSSharpness(ScalarNet([1.0, 1.0]), half_square, (x, x), **kwargs)
