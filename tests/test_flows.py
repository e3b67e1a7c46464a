"""Central flows against closed forms: a quadratic (σ² = 0) and a 2-D model held at the edge."""

from __future__ import annotations

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.flows import central_flow, sharpness_and_gradient

F64 = torch.float64


def test_quadratic_below_the_edge_is_scaled_gradient_flow():
    # L = ½ Σ a_i w_i², S = 3 < 2/η = 20: the flow is w(t) = exp(−η a t) w0 (Euler: (1 − η a dt)^k)
    a = torch.tensor([1.0, 3.0], dtype=F64)
    flow = central_flow(
        lambda w: 0.5 * (a * w * w).sum(),
        torch.ones(2, dtype=F64),
        0.1,
        10.0,
        dt=0.05,
        record_every=20,
    )
    k = (flow.times / 0.05).round().to(F64)[:, None]  # Euler steps taken
    euler = (1 - 0.1 * a[None, :] * 0.05) ** k
    assert torch.allclose(flow.weights, euler, rtol=1e-10)
    exact = torch.exp(-0.1 * a[None, :] * flow.times[:, None].to(F64))  # the ODE's solution
    assert torch.allclose(flow.weights, exact, rtol=3e-2)  # Euler: k(ηa·dt)²/2 ≈ 2 %
    assert float(flow.sigma2.abs().max()) == 0.0
    assert torch.allclose(flow.sharpness, torch.full_like(flow.sharpness, 3.0))


def test_sharpness_gradient_is_the_third_derivative_contraction():
    # L = ½ y x² + ½ x y²: H = [[y, x + y], [x + y, x]]; check ∇S against finite differences of S
    def loss(w):
        return 0.5 * w[1] * w[0] ** 2 + 0.5 * w[0] * w[1] ** 2

    w = torch.tensor([0.3, 1.7], dtype=F64)
    s, g = sharpness_and_gradient(loss, w)
    eps = 1e-6
    fd = [
        (
            sharpness_and_gradient(loss, w + eps * e)[0]
            - sharpness_and_gradient(loss, w - eps * e)[0]
        )
        / (2 * eps)
        for e in torch.eye(2, dtype=F64)
    ]
    assert torch.allclose(g, torch.stack(fd), atol=1e-6)
    assert float(s) == pytest.approx(
        float(torch.linalg.eigvalsh(torch.tensor([[1.7, 2.0], [2.0, 0.3]], dtype=F64))[-1]),
        abs=1e-12,
    )


def test_flow_is_held_at_the_edge_and_sigma2_is_stationary():
    # L = ½ y x² − y: gradient flow sharpens (y grows); the central flow stops S at 2/η and
    # σ² = −2⟨∇L, ∇S⟩/‖∇S‖² keeps it there. Here S = y (for x ≈ 0), ∇S = (0, 1), ∇L = (xy, ½x² − 1)
    # so σ² = 2 − x² and the flow's y stays at 2/η while x decays like exp(−η y t).
    eta = 0.5
    flow = central_flow(
        lambda w: 0.5 * w[1] * w[0] ** 2 - w[1],
        torch.tensor([1e-3, 1.0], dtype=F64),
        eta,
        200.0,
        dt=0.05,
    )
    at_edge = flow.sharpness >= 2 / eta * (1 - 1e-6)
    assert at_edge.any() and not at_edge[0]
    first = int(at_edge.nonzero()[0])
    assert float(flow.sharpness.max()) <= 2 / eta * (1 + 1e-3)  # held at the edge
    x = flow.weights[first:, 0]
    assert torch.allclose(flow.sigma2[first:], 2 - x**2, atol=1e-3)  # the closed form
    assert float(flow.predicted_loss[-1] - flow.loss[-1]) == pytest.approx(
        0.5 * (2 / eta) * float(flow.sigma2[-1]), rel=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": 0.0}, "eta, t_max, dt and record_every > 0"),
        ({"w0": torch.ones(2, 2)}, "flat parameter vector"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {"loss_fn": lambda w: (w**2).sum(), "w0": torch.ones(2), "eta": 0.1, "t_max": 1.0}
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        central_flow(**args)
