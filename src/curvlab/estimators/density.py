"""Spectral density by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from curvlab.estimators._common import progress_bar, symmetric_operator
from curvlab.estimators.probes import PROBES, sample_probes
from curvlab.estimators.results import SpectralDensity
from curvlab.operators._checks import check_choice, check_positive_float, check_positive_int
from curvlab.operators._context import in_full_precision
from curvlab.operators.base import LinearOperator

__all__ = ["lanczos_tridiagonal", "spectral_density"]


def lanczos_tridiagonal(
    A: LinearOperator, Z: Tensor, steps: int, *, bar: object | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""Run ``steps`` Lanczos steps from every column of ``Z`` at once (full re-orthogonalisation).

    Each step computes :math:`\alpha_j = v_j^\top A v_j`, orthogonalises :math:`A v_j` against
    the whole basis of its probe by two classical Gram-Schmidt passes (CGS2, which subsumes the
    three-term recurrence), and normalises by :math:`\beta_j`. The coefficients stay on the
    device until the end: a step has no host synchronisation.

    The probes advance in lockstep, so each step is one product with a ``[n, p]`` block (one
    graph build shared by the ``p`` columns). A probe whose Krylov space is exhausted
    (:math:`\beta_j \le 10^{-10} \max_i |\alpha_i|`) continues with zero vectors; the resulting
    zero couplings give its extra nodes zero weight.

    Returns:
        ``(alpha, beta)`` arrays of shapes ``[p, m]`` and ``[p, m - 1]`` in float64, with
        ``m = min(steps, n)``.
    """
    n, p = Z.shape
    m = min(steps, n)
    V = Z.new_empty(p, m, n)
    V[:, 0] = (Z / Z.norm(dim=0, keepdim=True)).T
    alpha = Z.new_zeros(p, m)
    beta = Z.new_zeros(p, max(m - 1, 0))
    amax = Z.new_zeros(p)
    for j in range(m):
        v = V[:, j]  # [p, n]
        W = A.matmat(v.T).T  # [p, n]
        a = torch.linalg.vecdot(W, v, out=alpha[:, j])
        if bar is not None:
            bar.update(p)  # type: ignore[attr-defined]
        if j == m - 1:
            break
        Vj, W3 = V[:, : j + 1], W.unsqueeze(1)  # [p, j+1, n], [p, 1, n]
        for _ in range(2):
            W3 = torch.baddbmm(W3, torch.bmm(W3, Vj.transpose(1, 2)), Vj, alpha=-1.0)
        b = torch.linalg.vector_norm(W3, dim=(1, 2))
        torch.maximum(amax, a.abs(), out=amax)
        live = b > amax.mul(1e-10)  # amax = 0 only for a zero probe, whose b is 0 too
        torch.mul(b, live, out=beta[:, j])
        scale = live / b.clamp_min(torch.finfo(b.dtype).tiny)  # 1/b, or 0 where exhausted
        torch.mul(W3.squeeze(1), scale.unsqueeze(1), out=V[:, j + 1])
    return alpha.double().cpu().numpy(), beta.double().cpu().numpy()


@in_full_precision
def spectral_density(
    A: LinearOperator | Tensor,
    num_probes: int = 4,
    lanczos_steps: int = 64,
    *,
    grid_size: int = 1000,
    sigma: float | None = None,
    probes: str = "rademacher",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SpectralDensity:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    For each probe ``z`` (normalised), ``m`` Lanczos steps give a tridiagonal
    :math:`T = S\Theta S^\top`; the Gauss quadrature with nodes :math:`\theta_j` and weights
    :math:`\tau_j = S_{1j}^2` satisfies :math:`\sum_j \tau_j f(\theta_j) \approx z^\top f(A) z/\|z\|^2`,
    exactly for polynomials of degree :math:`\le 2m-1`. Averaged over probes,
    :math:`\sum_j \tau_j \theta_j^k` is an unbiased estimate of :math:`\operatorname{tr}(A^k)/n` for
    Rademacher probes (whose norm is exactly :math:`\sqrt n`). The density is
    :math:`\phi(t) = \frac1{p}\sum_{\text{probes}}\sum_j \tau_j\, \mathcal N(t; \theta_j, \sigma^2)`
    on a grid (Ubaru, Chen, Saad 2017; Ghorbani, Krishnan, Xiao 2019, arXiv 1901.10159).
    Lanczos runs with full re-orthogonalisation and the probes advance in lockstep (one block
    product per step). Cost: ``num_probes × lanczos_steps`` products.

    Args:
        A: symmetric operator or dense symmetric tensor.
        num_probes: independent Lanczos runs.
        lanczos_steps: steps per run (nodes per probe).
        grid_size: points of the density grid.
        sigma: Gaussian broadening (default: 1 % of the node range).
        probes: ``"rademacher"`` or ``"gaussian"`` start vectors.
        generator: source of the probes.
        progress: show a progress bar.

    Returns:
        :class:`~curvlab.estimators.results.SpectralDensity` with raw nodes and weights.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> esd = spectral_density(A, num_probes=2, lanczos_steps=4)
        >>> round(float(esd.moment(1)), 10)  # tr(A)/n
        2.5
    """
    op = symmetric_operator(A, "spectral_density")
    check_choice(probes, PROBES, "probe kind")
    num_probes = check_positive_int(num_probes, "num_probes")
    lanczos_steps = check_positive_int(lanczos_steps, "lanczos_steps")
    grid_size = check_positive_int(grid_size, "grid_size")
    if sigma is not None:
        check_positive_float(sigma, "sigma")
    n = op.shape[0]
    Z = sample_probes(n, num_probes, probes, generator=generator, dtype=op.dtype, device=op.device)
    m = min(lanczos_steps, n)
    with progress_bar(num_probes * m, "spectral density", progress) as bar, op.fixed():
        alpha, beta = lanczos_tridiagonal(op, Z, m, bar=bar)
    nodes = np.zeros((num_probes, m))
    weights = np.zeros((num_probes, m))
    for i in range(num_probes):
        T = np.diag(alpha[i]) + np.diag(beta[i], 1) + np.diag(beta[i], -1)
        theta, S = np.linalg.eigh(T)
        nodes[i], weights[i] = theta, S[0] ** 2
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    s = sigma if sigma is not None else 0.01 * width
    grid = np.linspace(lo - 5 * s, hi + 5 * s, grid_size)
    diff = (grid[None, None, :] - nodes[:, :, None]) / s
    dens = (weights[:, :, None] * np.exp(-0.5 * diff**2)).sum(axis=(0, 1))
    dens /= num_probes * s * math.sqrt(2 * math.pi)
    return SpectralDensity(
        grid=torch.as_tensor(grid),
        density=torch.as_tensor(dens),
        nodes=torch.as_tensor(nodes),
        weights=torch.as_tensor(weights),
        sigma=float(s),
        num_matvecs=num_probes * m,
    )
