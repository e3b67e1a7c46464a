"""Frozen result records returned by the estimators: values, what they cost, how uncertain they are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["Eigenpairs", "Estimate", "LayerSensitivity", "SpectralDensity"]


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenvalues and eigenvectors from :func:`curvlab.eigsh` or :func:`curvlab.power_iteration`.

    Attributes:
        values: ``[k]`` eigenvalues, ordered as requested (``"LA"``: descending, ``"SA"``:
            ascending, ``"LM"``: descending magnitude).
        vectors: ``[n, k]`` orthonormal eigenvectors (columns).
        num_matvecs: operator products spent.
        converged: whether every residual met the tolerance.
        residuals: ``[k]`` Ritz residual norms ``‖A v − λ v‖``; for a symmetric operator each
            eigenvalue is within its residual of a true eigenvalue.
    """

    values: Tensor
    vectors: Tensor
    num_matvecs: int
    converged: bool
    residuals: Tensor


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its standard error and cost.

    Attributes:
        value: the estimate (a 0-d tensor for a trace, ``[n]`` for a diagonal).
        std_error: its estimated standard error (same shape as ``value``).
        num_matvecs: operator products spent.
        blocks: per-block estimates from the same products (name -> Estimate), if requested.
    """

    value: Tensor
    std_error: Tensor
    num_matvecs: int
    blocks: dict[str, Estimate] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class SpectralDensity:
    """A spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: ``[G]`` points where the density is evaluated.
        density: ``[G]`` Gaussian-broadened density (integrates to 1 over the grid).
        nodes: ``[num_probes, m]`` Ritz values of each probe's Lanczos run.
        weights: ``[num_probes, m]`` quadrature weights (squared first components; rows sum to 1).
        sigma: the Gaussian broadening's standard deviation.
        num_matvecs: operator products spent.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int

    def moment(self, j: int) -> Tensor:
        """The quadrature estimate of ``tr(A^j) / n``: the mean over probes of ``Σ w θ^j``."""
        return (self.weights * self.nodes**j).sum(dim=1).mean()


@dataclass(frozen=True)
class LayerSensitivity:
    """Per-block curvature figures (HAWQ-V2 sensitivity) from :func:`curvlab.layer_sensitivity`.

    Attributes:
        names: block names (modules).
        num_params: parameters per block.
        trace: Hessian trace per block (estimate).
        trace_std_error: its standard error.
        top_eigenvalue: largest eigenvalue of each diagonal block (NaN when not computed).
        num_matvecs: products spent in all.
    """

    names: tuple[str, ...]
    num_params: tuple[int, ...]
    trace: tuple[float, ...]
    trace_std_error: tuple[float, ...]
    top_eigenvalue: tuple[float, ...]
    num_matvecs: int

    @property
    def sensitivity(self) -> tuple[float, ...]:
        """HAWQ-V2's sensitivity ``tr(H_i) / n_i`` (the mean eigenvalue of block ``i``)."""
        return tuple(t / n for t, n in zip(self.trace, self.num_params))

    def rows(self) -> list[dict[str, Any]]:
        """One dict per block, for programs (JSON, pandas)."""
        return [
            {
                "block": name,
                "num_params": n,
                "trace": tr,
                "trace_std_error": se,
                "trace_per_param": tr / n,
                "top_eigenvalue": lam,
            }
            for name, n, tr, se, lam in zip(
                self.names, self.num_params, self.trace, self.trace_std_error, self.top_eigenvalue
            )
        ]

    def table(self) -> str:
        """A fixed-width table a person can read."""
        head = f"{'block':<24}{'params':>10}{'trace':>14}{'± s.e.':>12}{'trace/n':>12}{'λ_max':>12}"
        lines = [head, "-" * len(head)]
        for r in self.rows():
            lines.append(
                f"{r['block']:<24}{r['num_params']:>10d}{r['trace']:>14.5g}"
                f"{r['trace_std_error']:>12.3g}{r['trace_per_param']:>12.4g}"
                f"{r['top_eigenvalue']:>12.5g}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
