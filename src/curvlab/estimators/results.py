"""Frozen result records returned by the estimators: values, what they cost, how uncertain they are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from curvlab.errors import InvalidArgumentError, UnknownOptionError

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

    def allocate_bits(
        self,
        budget: float,
        choices: Sequence[int] = (2, 4, 8),
        *,
        perturbation: Mapping[str, Mapping[int, float]],
        by: str = "trace",
    ) -> dict[str, int]:
        r"""HAWQ-V2's bit allocation: the Pareto-optimal bits per block under a model-size budget.

        Rule: block ``i`` quantised to ``b`` bits costs :math:`\Omega_i(b) = s_i\,\|Q_b(W_i) -
        W_i\|^2` with the sensitivity :math:`s_i = \operatorname{tr}(H_i)/n_i` (``by="trace"``,
        HAWQ-V2) or :math:`s_i = \lambda_{\max}(H_i)` (``by="top_eigenvalue"``, HAWQ v1's
        measure); the model costs :math:`\sum_i \Omega_i(b_i)` and weighs :math:`\sum_i n_i b_i`
        bits. The Pareto frontier of (size, cost) over all configurations is built block by
        block (a configuration dominated in both is dropped, which keeps the search exact), and the
        cheapest configuration with ``Σ n_i b_i <= budget · Σ n_i`` is returned.

        Args:
            budget: the average bits per parameter allowed (e.g. ``4.0``).
            choices: the bit widths a block may take.
            perturbation: block name -> {bits: ``‖Q_b(W) − W‖²``}, e.g. from
                :func:`curvlab.compress.quantization_perturbation`.
            by: ``"trace"`` or ``"top_eigenvalue"``.

        Returns:
            block name -> bits.

        Raises:
            InvalidArgumentError: a budget below the smallest choice, an empty or non-positive
                ``choices``, a block missing from ``perturbation``, or NaN top eigenvalues with
                ``by="top_eigenvalue"``.
            UnknownOptionError: an unknown ``by``.

        Paper: Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural
        Networks", NeurIPS 2020, arXiv 1911.03852 (Section 3.2).
        """
        if by not in ("trace", "top_eigenvalue"):
            raise UnknownOptionError(f"by must be 'trace' or 'top_eigenvalue', got {by!r}")
        bits = sorted({int(b) for b in choices})
        if not bits or bits[0] < 1:
            raise InvalidArgumentError(f"choices must be positive bit widths, got {choices!r}")
        if not budget >= bits[0]:
            raise InvalidArgumentError(
                f"the bit budget {budget} bits per parameter is below the smallest choice "
                f"{bits[0]}: no allocation fits; raise the budget or add a smaller choice"
            )
        sens = self.sensitivity if by == "trace" else self.top_eigenvalue
        if any(s != s for s in sens):
            raise InvalidArgumentError(
                "top eigenvalues were not computed; call layer_sensitivity(..., "
                "top_eigenvalue=True) or use by='trace'"
            )
        missing = [n for n in self.names if n not in perturbation]
        if missing:
            raise InvalidArgumentError(f"perturbation has no entry for blocks {missing}")
        frontier: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
        for name, n, s in zip(self.names, self.num_params, sens):
            merged = sorted(
                (size + n * b, cost + s * float(perturbation[name][b]), (*cfg, b))
                for size, cost, cfg in frontier
                for b in bits
            )
            frontier = []
            for entry in merged:  # keep the points no smaller configuration beats in cost
                if not frontier or entry[1] < frontier[-1][1]:
                    frontier.append(entry)
        limit = budget * sum(self.num_params)
        best = min((e for e in frontier if e[0] <= limit + 1e-9), key=lambda e: e[1])
        return dict(zip(self.names, best[2]))

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
