"""Central flows against closed forms: a quadratic (σ² = 0) and a 2-D model held at the edge."""

from __future__ import annotations

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.flows import _flow_state, central_flow, rmsprop_central_flow, sharpness_and_gradient

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


# ---- RMSProp: the preconditioned sharpness and its central flow ------------------------------


def _cubic_mlp_loss(n_hidden: int):
    """A small tanh network's square loss on fixed data, as a function of its flat parameters."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 2, generator=gen, dtype=F64)
    y = torch.sin(x[:, :1])

    def loss(w):
        w1 = w[: 2 * n_hidden].reshape(n_hidden, 2)
        w2 = w[2 * n_hidden :].reshape(1, n_hidden)
        return 0.5 * ((torch.tanh(x @ w1.T) @ w2.T - y) ** 2).mean()

    return loss, torch.randn(3 * n_hidden, generator=gen, dtype=F64)


@pytest.mark.parametrize("n_hidden", [3, 7])  # 9 parameters (one-graph path), 21 (dense path)
def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h(n_hidden):
    loss, w = _cubic_mlp_loss(n_hidden)
    gen = torch.Generator().manual_seed(4)
    p = 0.1 + torch.rand(w.numel(), generator=gen, dtype=F64)
    hess = torch.autograd.functional.hessian(loss, w)
    dense = torch.linalg.eigvals(hess / p[:, None]).real.max()  # P⁻¹H, non-symmetric, float64
    _, _, s, grad_s, u = _flow_state(loss, w, p)
    assert float(s) == pytest.approx(float(dense), rel=1e-10)
    assert torch.allclose(hess @ u, s * p * u, atol=1e-10)  # Hu = S·Pu
    assert float(u @ (p * u)) == pytest.approx(1.0, rel=1e-12)  # uᵀPu = 1
    s_pub, grad_pub = sharpness_and_gradient(loss, w, p)
    assert float(s_pub) == pytest.approx(float(s), rel=1e-12)
    assert torch.allclose(grad_pub, grad_s, atol=1e-12)
    eps = 1e-6  # ∇S against central differences of S at fixed P
    fd = torch.stack(
        [
            (
                sharpness_and_gradient(loss, w + eps * e, p)[0]
                - sharpness_and_gradient(loss, w - eps * e, p)[0]
            )
            / (2 * eps)
            for e in torch.eye(w.numel(), dtype=F64)[:4]
        ]
    )
    assert torch.allclose(grad_s[:4], fd, atol=1e-6)


def test_rmsprop_stable_flow_converges_to_the_ode_solution_at_first_order():
    # a quadratic far below the edge: σ² = 0 and the flow is the (w, ν) ODE, solved by scipy
    from scipy.integrate import solve_ivp

    a, eta, beta2 = torch.tensor([1.0, 0.3], dtype=F64), 0.05, 0.9
    kappa = (1 - beta2) / beta2
    w0, nu0 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 0.2], dtype=F64)

    def rhs(_, z):
        w, nu = z[:2], z[2:]
        g = a.numpy() * w
        return [*(-eta * g / nu**0.5), *(kappa * (g * g - nu))]

    ref = solve_ivp(rhs, (0, 20), [*w0.tolist(), *nu0.tolist()], rtol=1e-11, atol=1e-12).y[:, -1]
    errors = []
    for dt in (0.1, 0.05):
        flow = rmsprop_central_flow(
            lambda w: 0.5 * (a * w * w).sum(),
            w0,
            eta,
            beta2,
            20.0,
            nu0=nu0,
            dt=dt,
            record_every=round(20 / dt),
        )
        assert float(flow.sigma2.abs().max()) == 0.0 and float(flow.sharpness.max()) < 2 / eta
        end = torch.cat([flow.weights[-1], flow.nu[-1]])
        errors.append(float((end - torch.tensor(ref, dtype=F64)).abs().max()))
    assert errors[1] < 1e-2 and errors[0] / errors[1] == pytest.approx(2.0, rel=0.1)  # Euler: O(dt)


def test_rmsprop_flow_at_the_edge_follows_its_closed_form():
    # L = ½ y x² − y on x = 0: H = diag(y, 0), P⁻¹H has S = y/s with s = √ν_x, u = e_x/√s and
    # ν_y stays 1. At the edge y = 2s/η; dS/dt = 0 with dy/dt = η(1 − σ²/2s) and
    # ds/dt = κ(2σ²/η² − s/2) gives σ² = (η + κs/η)/(η/2s + 4κ/η³) and, integrated,
    # (η/2)·ln s + 4κs/η³ − κ(2/η − η/4)·t = const.
    eta, beta2 = 0.5, 0.9
    kappa = (1 - beta2) / beta2
    drift = []
    for dt in (0.1, 0.05):
        flow = rmsprop_central_flow(
            lambda w: 0.5 * w[1] * w[0] ** 2 - w[1],
            torch.tensor([0.0, 2.0], dtype=F64),
            eta,
            beta2,
            50.0,
            nu0=torch.ones(2, dtype=F64),
            dt=dt,
            record_every=round(1 / dt),
        )
        first = int((flow.sigma2 > 0).nonzero()[0]) + 1  # the first record fully on the edge
        assert 0 < first < 10  # reached from below (S(0) = 2 < 2/η = 4)
        s, t = flow.nu[first:, 0].sqrt(), flow.times[first:].to(F64)
        assert torch.equal(flow.nu[:, 1], torch.ones_like(t[:1]).expand(len(flow.times)))
        assert torch.allclose(flow.weights[first:, 1], 2 * s / eta, atol=5 * dt * 1e-3)
        sigma2 = (eta + kappa * s / eta) / (eta / (2 * s) + 4 * kappa / eta**3)
        assert torch.allclose(flow.sigma2[first:], sigma2, rtol=0.04 * dt)
        inv = eta / 2 * torch.log(s) + 4 * kappa * s / eta**3 - kappa * (2 / eta - eta / 4) * t
        drift.append(float((inv - inv[0]).abs().max()))
        assert float(flow.sharpness.max()) <= 2 / eta * (1 + 1e-3 * dt)
    assert drift[1] < 2e-3 and drift[0] / drift[1] == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta2": 1.0}, "0 < beta2 < 1"),
        ({"eps": -1.0}, "eps >= 0"),
        ({"dt": 20.0}, "so that ν stays positive"),
        ({"nu0": torch.zeros(2)}, "nu0 > 0 shaped like w0"),
        ({"nu0": torch.ones(3)}, "nu0 > 0 shaped like w0"),
        ({"t_max": 0.0}, "eta, t_max, dt and record_every > 0"),
    ],
)
def test_rmsprop_bad_inputs(kwargs, match):
    args = {"loss_fn": lambda w: (w**2).sum(), "w0": torch.ones(2), "eta": 0.1, "beta2": 0.9}
    args.update({"t_max": 1.0, **kwargs})
    with pytest.raises(InvalidArgumentError, match=match):
        rmsprop_central_flow(**args)
