"""Tests of curvlab.estimators.param_diagonal (Hutchinson, GNB, spatial averaging)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from curvlab.errors import ClosureRequiredError, ParameterError, ShapeMismatchError
from curvlab.estimators import (
    GNBEstimator,
    HutchinsonEstimator,
    gnb_diagonal,
    hutchinson_diagonal,
    spatial_average,
)
from curvlab.estimators.probes import rademacher_like

DT = torch.float64


def _quadratic_grad(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    loss = 0.5 * x @ (a @ x)
    (g,) = torch.autograd.grad(loss, [x], create_graph=True)
    return g


def _sym(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=DT)
    return (b + b.T) / 2


# --- Hutchinson: what is exact ---------------------------------------------------------------


def test_hutchinson_exact_on_diagonal_quadratic() -> None:
    """z_i² = 1, so on f(x) = ½ xᵀDx every single draw returns D exactly."""
    d = torch.tensor([0.5, 3.0, -2.0, 7.0, 1e-3], dtype=DT)
    x = torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(1)).requires_grad_()
    for seed in range(5):
        g = _quadratic_grad(torch.diag(d), x)
        (est,) = hutchinson_diagonal([x], [g], generator=torch.Generator().manual_seed(seed))
        assert torch.equal(est, d)


def test_hutchinson_single_draw_is_z_times_hz() -> None:
    """With explicit probes the estimate is exactly z ⊙ (A z) = diag(A) + off-diagonal terms."""
    a = _sym(6, 0)
    x = torch.zeros(6, dtype=DT, requires_grad=True)
    z = rademacher_like([x], generator=torch.Generator().manual_seed(3))[0]
    (est,) = hutchinson_diagonal([x], [_quadratic_grad(a, x)], probes=[z])
    torch.testing.assert_close(est, z * (a @ z), rtol=0, atol=1e-14)
    off = a - torch.diag(torch.diagonal(a))
    torch.testing.assert_close(est - torch.diagonal(a), z * (off @ z), rtol=0, atol=1e-14)


def test_hutchinson_several_params_one_grad_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-parameter Hessian blocks enter through one autograd.grad call over all params."""
    u = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    w = torch.tensor([[0.5, 1.5], [2.0, -1.0]], dtype=DT, requires_grad=True)
    v = torch.tensor(0.3, dtype=DT, requires_grad=True)
    params = [u, w, v]
    loss = (w @ u).pow(2).sum() * torch.exp(v) + (u**3).sum()
    grads = list(torch.autograd.grad(loss, params, create_graph=True))
    calls = []
    real_grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    zs = rademacher_like(params, generator=torch.Generator().manual_seed(0))
    est = hutchinson_diagonal(params, grads, probes=zs)
    monkeypatch.undo()
    assert len(calls) == 1
    # dense check: z ⊙ (H z) with H from torch.autograd.functional.hessian of the flat function
    sizes = [p.numel() for p in params]

    def f(flat: torch.Tensor) -> torch.Tensor:
        uu, ww, vv = flat.split(sizes)
        return (ww.view(2, 2) @ uu).pow(2).sum() * torch.exp(vv[0]) + (uu**3).sum()

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    h = torch.autograd.functional.hessian(f, flat)
    z = torch.cat([t.reshape(-1) for t in zs])
    expect = (z * (h @ z)).split(sizes)
    for e, p, x in zip(est, params, expect):
        torch.testing.assert_close(e, x.view_as(p), rtol=1e-12, atol=1e-12)


def test_hutchinson_linear_and_unused_params() -> None:
    """A gradient without graph (loss linear in the param) gives zero curvature; unused → None."""
    a = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    b = torch.tensor([3.0], dtype=DT, requires_grad=True)
    unused = torch.tensor([1.0], dtype=DT, requires_grad=True)
    loss = (a * torch.tensor([2.0, 5.0], dtype=DT)).sum()
    grads = list(torch.autograd.grad(loss, [a, b, unused], create_graph=True, allow_unused=True))
    assert grads[0].grad_fn is None
    est = hutchinson_diagonal([a, b, unused], grads, generator=torch.Generator().manual_seed(0))
    assert torch.equal(est[0], torch.zeros(2, dtype=DT))
    assert est[1] is None and est[2] is None


def test_hutchinson_shape_errors() -> None:
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ShapeMismatchError, match="one gradient"):
        hutchinson_diagonal([x], [])
    g = _quadratic_grad(torch.eye(2), x)
    with pytest.raises(ShapeMismatchError, match="one probe per parameter"):
        hutchinson_diagonal([x], [g], probes=[torch.ones(3)])


# --- Hutchinson: what is statistical ---------------------------------------------------------


def test_hutchinson_unbiased_within_variance_bound() -> None:
    """Mean of M draws → diag(A); per-coordinate std is sqrt(Σ_{j≠i} A_ij² / M), allow 5σ."""
    n, m = 8, 800
    a = _sym(n, 4)
    x = torch.zeros(n, dtype=DT, requires_grad=True)
    gen = torch.Generator().manual_seed(11)
    draws = torch.stack(
        [hutchinson_diagonal([x], [_quadratic_grad(a, x)], generator=gen)[0] for _ in range(m)]
    )
    off = a - torch.diag(torch.diagonal(a))
    sigma = (off.pow(2).sum(1) / m).sqrt()
    err = (draws.mean(0) - torch.diagonal(a)).abs()
    assert bool((err < 5 * sigma).all()), (err / sigma).max()
    # and the estimator is not trivially exact here: single draws do scatter
    assert draws.std(0).min() > 0.1


def test_probe_moments_through_the_estimator() -> None:
    """Probes used by hutchinson_diagonal are ±1 with both signs, mean 0, E[z zᵀ] = I.

    On A = e1e2ᵀ + e2e1ᵀ the estimate is (z1 z2, z1 z2, 0): its mean is 0 only if the probe's
    off-diagonal second moment vanishes (a probe that is always −1 would give exactly 1).
    """
    n, m = 3, 2000
    a = torch.zeros(n, n, dtype=DT)
    a[0, 1] = a[1, 0] = 1.0
    x = torch.zeros(n, dtype=DT, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    draws = torch.stack(
        [hutchinson_diagonal([x], [_quadratic_grad(a, x)], generator=gen)[0] for _ in range(m)]
    )
    assert set(draws[:, 0].tolist()) == {-1.0, 1.0}
    assert abs(draws[:, 0].mean().item()) < 5 / math.sqrt(m)
    assert torch.equal(draws[:, 2], torch.zeros(m, dtype=DT))


def test_probe_moments_direct() -> None:
    """rademacher_like, as the optimizers draw it: values ±1, mean 0, E[z zᵀ] = I (5σ bounds)."""
    gen = torch.Generator().manual_seed(0)
    m, n = 4000, 6
    z = torch.stack([torch.cat(rademacher_like([torch.empty(n)], generator=gen)) for _ in range(m)])
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert bool((z.mean(0).abs() < 5 / math.sqrt(m)).all())
    second = z.T @ z / m
    torch.testing.assert_close(torch.diagonal(second), torch.ones(n))
    off = second - torch.diag(torch.diagonal(second))
    assert off.abs().max() < 5 / math.sqrt(m)


def test_hutchinson_estimator_protocol() -> None:
    """HutchinsonEstimator declares create_graph=True and returns z ⊙ (H z) without graph."""
    hutchinson_estimator = HutchinsonEstimator()
    assert hutchinson_estimator.create_graph is True
    x = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    d = torch.tensor([2.0, 3.0, 4.0], dtype=DT)
    grads = list(torch.autograd.grad(0.5 * (d * x * x).sum(), [x], create_graph=True))
    (diag,) = hutchinson_estimator([x], grads, None, torch.Generator().manual_seed(0))
    assert torch.equal(diag, d) and diag.grad_fn is None


# --- Gauss-Newton-Bartlett --------------------------------------------------------------------


def _softmax_regression(seed: int, n: int = 6, d: int = 3, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    w = (0.5 * torch.randn(d, c, generator=g, dtype=DT)).requires_grad_()
    b = (0.1 * torch.randn(c, generator=g, dtype=DT)).requires_grad_()
    return x, w, b


def test_gnb_batch_size_convention_exact() -> None:
    """Estimate = B · ĝ ⊙ ĝ with ĝ the gradient of the mean CE on labels drawn from the logits."""
    x, w, b = _softmax_regression(0)
    logits = x @ w + b
    est = gnb_diagonal([w, b], logits, generator=torch.Generator().manual_seed(7))
    # the same draw by hand
    probs = torch.softmax(logits.detach().float(), -1)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    loss = F.cross_entropy(x @ w + b, labels)
    gw, gb = torch.autograd.grad(loss, [w, b])
    n = x.shape[0]
    torch.testing.assert_close(est[0], n * gw * gw, rtol=1e-13, atol=0)
    torch.testing.assert_close(est[1], n * gb * gb, rtol=1e-13, atol=0)
    est2 = gnb_diagonal(
        [w, b], x @ w + b, generator=torch.Generator().manual_seed(7), batch_size=2 * n
    )
    torch.testing.assert_close(est2[0], 2 * est[0], rtol=1e-13, atol=0)


def test_gnb_sequence_outputs_count_every_prediction() -> None:
    """For logits [batch, time, C] B counts batch·time predictions (the authors' tokens)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 5, generator=g, dtype=DT, requires_grad=True)
    x = torch.randn(2, 4, 3, generator=g, dtype=DT)
    est = gnb_diagonal([w], x @ w, generator=torch.Generator().manual_seed(1))
    est_flat = gnb_diagonal([w], x.reshape(8, 3) @ w, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(est[0], est_flat[0], rtol=1e-13, atol=0)


def test_gnb_unbiased_for_gauss_newton_diagonal() -> None:
    """E[B ĝ⊙ĝ] = diag of the Gauss-Newton matrix of the mean CE (= the Hessian: logits linear)."""
    x, w, b = _softmax_regression(3)
    m = 3000
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [gnb_diagonal([w], x @ w + b, generator=gen)[0].reshape(-1) for _ in range(m)]
    )

    def f(flat: torch.Tensor) -> torch.Tensor:
        logits = x @ flat.view_as(w) + b.detach()
        return F.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long))

    hess_diag = torch.diagonal(torch.autograd.functional.hessian(f, w.detach().reshape(-1)))
    sigma = draws.std(0) / math.sqrt(m)
    err = (draws.mean(0) - hess_diag).abs()
    assert bool((err < 5 * sigma + 1e-12).all()), (err / sigma).max()
    assert bool((draws >= 0).all())


def test_gnb_gaussian_likelihood_unbiased() -> None:
    """Gaussian GNB on a linear regression: E[B ĝ⊙ĝ] = (1/B) Σ_b x_b² (Gauss-Newton diagonal)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    w = torch.randn(3, 1, generator=g, dtype=DT, requires_grad=True)
    m = 2000
    gen = torch.Generator().manual_seed(9)
    draws = torch.stack(
        [
            gnb_diagonal([w], x @ w, generator=gen, likelihood="gaussian")[0].reshape(-1)
            for _ in range(m)
        ]
    )
    expect = (x**2).mean(0)
    sigma = draws.std(0) / math.sqrt(m)
    assert bool(((draws.mean(0) - expect).abs() < 5 * sigma).all())


def test_gnb_errors() -> None:
    w = torch.zeros(2, 3, requires_grad=True)
    logits = torch.ones(4, 2) @ w
    with pytest.raises(ParameterError, match="unknown likelihood 'poisson'; use 'categorical'"):
        gnb_diagonal([w], logits, likelihood="poisson")
    with pytest.raises(ClosureRequiredError, match=r"return \(loss, logits\)"):
        GNBEstimator()([w], [None], None, None)
    with pytest.raises(ClosureRequiredError, match="with their autograd graph"):
        GNBEstimator()([w], [None], logits.detach(), None)
    with pytest.raises(ParameterError, match="likelihood must be 'categorical' or 'gaussian'"):
        GNBEstimator(likelihood="poisson")
    with pytest.raises(ParameterError, match="bs must be a positive int"):
        GNBEstimator(batch_size=0)


def test_gnb_estimator_shares_the_forward_pass_of_the_gradient() -> None:
    """The optimizer takes the loss gradient with retain_graph; the estimator reuses the graph."""
    gnb_estimator = GNBEstimator()
    assert gnb_estimator.create_graph is False
    x, w, b = _softmax_regression(1)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    logits = x @ w + b
    grads = list(torch.autograd.grad(F.cross_entropy(logits, y), [w, b], retain_graph=True))
    diag = gnb_estimator([w, b], grads, logits, torch.Generator().manual_seed(3))
    gw, _ = torch.autograd.grad(F.cross_entropy(x @ w + b, y), [w, b])
    torch.testing.assert_close(grads[0], gw, rtol=1e-14, atol=0)
    ref = gnb_diagonal([w, b], x @ w + b, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(diag[0], ref[0], rtol=1e-14, atol=0)
    assert all(t.grad_fn is None for t in diag)


# --- spatial averaging ------------------------------------------------------------------------


def test_spatial_average_conv_kernel_as_official() -> None:
    """4-D kernels: mean of |·| over dims (2, 3), kept as size-1 dims; 0-2-D: |·|."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4, 3, 3, 3, generator=g, dtype=DT)
    out = spatial_average(k)
    assert out.shape == (4, 3, 1, 1)
    for o in range(4):
        for i in range(3):
            assert out[o, i, 0, 0].item() == pytest.approx(k[o, i].abs().mean().item(), rel=1e-14)
    m = torch.randn(5, 2, generator=g, dtype=DT)
    assert torch.equal(spatial_average(m), m.abs())
    assert torch.equal(spatial_average(torch.tensor(-2.0)), torch.tensor(2.0))
    k1 = torch.randn(2, 3, 5, generator=g)
    torch.testing.assert_close(spatial_average(k1), k1.abs().mean(-1, keepdim=True))


def test_gnb_keeps_a_generator_of_the_outputs_device_and_samples_meta_outputs_in_place():
    from curvlab.estimators.param_diagonal import _generator_on

    g = torch.Generator().manual_seed(0)
    assert _generator_on(torch.device("cpu"), g) is g  # same device: the stream itself
    assert _generator_on(torch.device("cpu"), None) is None
    assert _generator_on(torch.device("meta"), g) is None  # shapes only: nothing to follow
    # on meta outputs nothing is read back to the host (no copy of the logits)
    w = torch.empty(3, 2, device="meta", requires_grad=True)
    (d,) = gnb_diagonal([w], torch.empty(5, 3, device="meta") @ w, generator=g)
    assert d is not None and d.device.type == "meta" and d.shape == (3, 2)
