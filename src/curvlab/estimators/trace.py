"""Stochastic trace estimation: Hutchinson and Hutch++, with per-block traces from one probe set."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor

from curvlab.errors import InvalidArgumentError
from curvlab.estimators._common import (
    BlockSpec,
    block_sum,
    check_probe_options,
    progress_bar,
    resolve_blocks,
    symmetric_operator,
)
from curvlab.estimators.probes import sample_probes
from curvlab.estimators.results import Estimate
from curvlab.operators._checks import check_choice, check_positive_float
from curvlab.operators._context import in_full_precision
from curvlab.operators.base import LinearOperator

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ProbeOptions", "hutchinson_trace", "hutchpp_trace", "trace"]

_METHODS = ("hutch++", "hutchpp", "hutchinson", "exact")


class ProbeOptions(TypedDict, total=False):
    """Keyword options of the stochastic trace estimators (see :func:`trace`)."""

    probes: str
    blocks: str | BlockSpec | None
    chunk_size: int
    generator: torch.Generator | None
    progress: bool


def _mean_and_error(samples: Tensor) -> tuple[Tensor, Tensor]:
    m = samples.shape[0]
    mean = samples.mean(dim=0)
    se = samples.std(dim=0) / math.sqrt(m) if m > 1 else torch.full_like(mean, math.inf)
    return mean, se


@in_full_precision
def trace(
    A: LinearOperator | Tensor,
    num_matvecs: int = 99,
    method: str = "hutch++",
    *,
    probes: str = "rademacher",
    blocks: str | BlockSpec | None = None,
    rtol: float | None = None,
    chunk_size: int = 8,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Estimate:
    r"""Estimate :math:`\operatorname{tr}(A)` of a symmetric operator from ``num_matvecs`` products.

    * ``"hutchinson"``: :math:`\frac1m \sum_i z_i^\top A z_i` with probes :math:`E[zz^\top]=I`.
      For Rademacher probes :math:`\operatorname{Var}(z^\top A z) = 2(\|A\|_F^2 - \sum_i a_{ii}^2)`.
      Probes are streamed ``chunk_size`` at a time: memory does not grow with ``m``. With ``rtol``
      it stops early once the standard error is below ``rtol·|estimate|`` (after 10 probes).
    * ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021, arXiv 2010.09649): a third of the budget
      sketches the top range :math:`Q = \operatorname{orth}(AS)`, a third computes
      :math:`\operatorname{tr}(Q^\top A Q)` exactly, the rest runs Hutchinson on the deflated
      :math:`(I-QQ^\top)A(I-QQ^\top)`. It needs :math:`O(1/\epsilon)` products instead of
      :math:`O(1/\epsilon^2)` when the spectrum decays; memory is ``n × m/3``.

    Per-block traces (``blocks="module"`` on a curvature operator, or a mapping name -> slices)
    come from the *same* products: Hutchinson uses :math:`z_b^\top (Az)_b`; Hutch++ adds the exact
    :math:`\operatorname{tr}_b(AQQ^\top)` to :math:`z_b^\top (A(I-QQ^\top)z)_b`, so every block
    estimate is unbiased and they sum to the full estimate's expectation.

    Args:
        A: a symmetric operator or dense symmetric tensor.
        num_matvecs: the product budget ``m`` (Hutch++ needs at least 3).
        method: ``"hutch++"`` (default), ``"hutchinson"``, or ``"exact"`` (the sum of an exact
            diagonal, for operators that have one, see :func:`~curvlab.diagonal`).
        probes: ``"rademacher"`` or ``"gaussian"``.
        blocks: per-block traces to return in ``Estimate.blocks``.
        rtol: Hutchinson's stopping rule on the standard error (``None``: use the whole budget).
        chunk_size: probes multiplied per operator call.
        generator: source of the probes.
        progress: show a progress bar.

    Returns:
        :class:`~curvlab.estimators.results.Estimate` (``std_error`` from the sample variance of the
        stochastic part; Hutch++'s sketched part is exact).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> float(trace(A, num_matvecs=9, method="hutchinson").value)  # diagonal: exact for ±1
        15.0
    """
    op = symmetric_operator(A, "trace")
    method = check_choice(method, _METHODS, "trace method")
    options: ProbeOptions = {
        "probes": probes,
        "blocks": blocks,
        "chunk_size": chunk_size,
        "generator": generator,
        "progress": progress,
    }
    if method == "hutchinson":
        return hutchinson_trace(op, num_matvecs, rtol=rtol, **options)
    if method == "exact":
        d = op.exact_diagonal()
        zero = torch.zeros((), dtype=d.dtype, device=d.device)
        per = {
            b: Estimate(block_sum(d, sl), zero, 0) for b, sl in resolve_blocks(op, blocks).items()
        }
        return Estimate(d.sum(), zero, 0, per)
    return hutchpp_trace(op, num_matvecs, **options)


@in_full_precision
def hutchinson_trace(
    A: LinearOperator | Tensor,
    num_matvecs: int = 100,
    *,
    rtol: float | None = None,
    **options: Unpack[ProbeOptions],
) -> Estimate:
    """Hutchinson's trace estimator; see :func:`trace` for the rule and arguments."""
    op = symmetric_operator(A, "hutchinson_trace")
    probes, spec, chunk_size, generator, progress = _resolve(op, num_matvecs, options)
    if rtol is not None:
        check_positive_float(rtol, "rtol")
    n = op.shape[0]
    samples: list[Tensor] = []
    block_samples: dict[str, list[Tensor]] = {b: [] for b in spec}
    used = 0
    with progress_bar(num_matvecs, "trace", progress) as bar:
        while used < num_matvecs:
            c = min(chunk_size, num_matvecs - used)
            Z = sample_probes(n, c, probes, generator=generator, dtype=op.dtype, device=op.device)
            AZ = op.matmat(Z)
            ZAZ = Z * AZ
            samples.append(ZAZ.sum(dim=0))
            for b, slices in spec.items():
                block_samples[b].append(block_sum(ZAZ, slices))
            used += c
            bar.update(c)
            if rtol is not None and used >= 10:
                mean, se = _mean_and_error(torch.cat(samples))
                if float(se) <= rtol * abs(float(mean)):
                    break
    mean, se = _mean_and_error(torch.cat(samples))
    per_block = {}
    for b, parts in block_samples.items():
        bm, bse = _mean_and_error(torch.cat(parts))
        per_block[b] = Estimate(bm, bse, used)
    return Estimate(mean, se, used, per_block)


@in_full_precision
def hutchpp_trace(
    A: LinearOperator | Tensor, num_matvecs: int = 99, **options: Unpack[ProbeOptions]
) -> Estimate:
    """Hutch++ trace estimator; see :func:`trace` for the rule and arguments."""
    op = symmetric_operator(A, "hutchpp_trace")
    probes, spec, chunk_size, generator, progress = _resolve(op, num_matvecs, options)
    if num_matvecs < 3:
        raise InvalidArgumentError(
            f"Hutch++ needs num_matvecs >= 3 (a sketch, its product and probes), got "
            f"{num_matvecs}; pass more products or method='hutchinson'"
        )
    n = op.shape[0]
    k_sketch = min(num_matvecs // 3, n)
    k_probe = num_matvecs - 2 * k_sketch
    dt, dev = op.dtype, op.device
    with progress_bar(num_matvecs, "trace (hutch++)", progress) as bar:
        S = sample_probes(n, k_sketch, probes, generator=generator, dtype=dt, device=dev)
        Q, _ = torch.linalg.qr(_chunked(op, S, chunk_size, bar))
        AQ = _chunked(op, Q, chunk_size, bar)
        exact = (Q * AQ).sum()  # tr(Qᵀ A Q)
        exact_rows = (AQ * Q).sum(dim=1)  # diag(A Q Qᵀ), for per-block traces
        samples: list[Tensor] = []
        block_samples: dict[str, list[Tensor]] = {b: [] for b in spec}
        used = 0
        while used < k_probe:
            c = min(chunk_size, k_probe - used)
            Z = sample_probes(n, c, probes, generator=generator, dtype=dt, device=dev)
            Zp = Z - Q @ (Q.T @ Z)
            AZp = op.matmat(Zp)
            samples.append((Zp * AZp).sum(dim=0))
            for b, slices in spec.items():
                block_samples[b].append(block_sum(Z * AZp, slices))
            used += c
            bar.update(c)
    total = 2 * k_sketch + k_probe
    if samples:
        mean, se = _mean_and_error(torch.cat(samples))
    else:
        mean, se = torch.zeros((), dtype=dt, device=dev), torch.zeros((), dtype=dt, device=dev)
    per_block = {}
    for b, slices in spec.items():
        part = block_sum(exact_rows, slices)
        if block_samples[b]:
            bm, bse = _mean_and_error(torch.cat(block_samples[b]))
        else:
            bm, bse = torch.zeros_like(part), torch.zeros_like(part)
        per_block[b] = Estimate(part + bm, bse, total)
    return Estimate(exact + mean, se, total, per_block)


def _resolve(
    op: LinearOperator, num_matvecs: int, options: ProbeOptions
) -> tuple[str, dict[str, list[slice]], int, torch.Generator | None, bool]:
    """Validate the budget and options; return probes, block slices, chunk size, generator, progress."""
    probes = options.get("probes", "rademacher")
    chunk_size = options.get("chunk_size", 8)
    check_probe_options(num_matvecs, probes, chunk_size)
    spec = resolve_blocks(op, options.get("blocks"))
    return probes, spec, chunk_size, options.get("generator"), options.get("progress", False)


def _chunked(op: LinearOperator, X: Tensor, chunk_size: int, bar: object) -> Tensor:
    cols = []
    for start in range(0, X.shape[1], chunk_size):
        block = X[:, start : start + chunk_size]
        cols.append(op.matmat(block))
        bar.update(block.shape[1])  # type: ignore[attr-defined]
    return torch.cat(cols, dim=1) if cols else X.clone()
