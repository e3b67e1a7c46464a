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
    check_samples,
    default_chunk_size,
    probe_columns,
    probe_rows,
    progress_bar,
    resolve_blocks,
    symmetric_operator,
)
from curvlab.estimators.results import Estimate
from curvlab.operators._checks import check_choice, check_positive_float
from curvlab.operators._context import in_full_precision
from curvlab.operators.base import LinearOperator

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "SKETCH_BYTES",
    "ProbeOptions",
    "hutchinson_trace",
    "hutchpp_trace",
    "max_sketch",
    "trace",
]

_METHODS = ("hutch++", "hutchpp", "hutchinson", "exact")
SKETCH_BYTES = 256 << 20
"""The memory Hutch++'s sketch may take (the rest of the budget goes to deflated probes)."""


class ProbeOptions(TypedDict, total=False):
    """Keyword options of the stochastic trace estimators (see :func:`trace`)."""

    probes: str
    blocks: str | BlockSpec | None
    chunk_size: int | None
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
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Estimate:
    r"""Estimate :math:`\operatorname{tr}(A)` of a symmetric operator from ``num_matvecs`` products.

    * ``"hutchinson"``: :math:`\frac1m \sum_i z_i^\top A z_i` with probes :math:`E[zz^\top]=I`.
      For Rademacher probes :math:`\operatorname{Var}(z^\top A z) = 2(\|A\|_F^2 - \sum_i a_{ii}^2)`.
      Probes are drawn and multiplied ``chunk_size`` at a time: memory does not grow with ``m``.
      With ``rtol`` it stops early once the standard error is below ``rtol·|estimate|`` (after
      10 probes).
    * ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021, arXiv 2010.09649): a third of the budget
      sketches the top range :math:`Q = \operatorname{orth}(AS)`, a third computes
      :math:`\operatorname{tr}(Q^\top A Q)` exactly, the rest runs Hutchinson on the deflated
      :math:`(I-QQ^\top)A(I-QQ^\top)`. It needs :math:`O(1/\epsilon)` products instead of
      :math:`O(1/\epsilon^2)` when the spectrum decays. Memory is the sketch itself, ``n × s``
      with ``s = min(m/3, n, SKETCH_BYTES / (n · itemsize))`` (256 MiB: at m = 300 the cap
      bites above ~670k float32 or ~335k float64 parameters): the sketch's probes and the
      products with ``Q`` are streamed ``chunk_size`` at a time, ``Q`` is orthonormalised in
      place, and the budget the cap leaves goes to the deflated probes, so memory stays flat in
      ``m`` beyond ``3s``.

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
        chunk_size: probes multiplied per operator call; ``None`` picks it from ``n``
            (:func:`~curvlab.estimators._common.default_chunk_size`: 8 up to 262k parameters,
            then fewer, 1 from 2.1M: at that size a column costs as much alone as in a block,
            and each costs memory).
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
    samples: list[Tensor] = []
    block_samples: dict[str, list[Tensor]] = {b: [] for b in spec}
    used = 0
    on_host = op.device.type == "cpu"  # there zᵀAz is read per chunk: the products' own check
    with progress_bar(num_matvecs, "trace", progress) as bar, op.fixed(check_products=not on_host):
        # one probe buffer for every chunk: the same pages each time (fresh ones cost page
        # faults: up to a tenth of a product at 5M parameters)
        buffer = torch.empty(min(chunk_size, num_matvecs), op.shape[0], dtype=op.dtype,
                             device=op.device)  # fmt: skip
        while used < num_matvecs:
            c = min(chunk_size, num_matvecs - used)
            Z = probe_rows(op, c, probes, generator, out=buffer[:c])
            if spec:
                ZAZ = op._probe_products(Z)  # z ⊙ Az as rows: their sums are zᵀAz
                sample = ZAZ.sum(dim=1)  # (on rows: 40 % faster than vecdot on the columns)
                for b, slices in spec.items():
                    block_samples[b].append(block_sum(ZAZ.T, slices))
                del ZAZ
            else:
                sample = op._probe_quadratics(Z)
            if on_host:
                check_samples(op, Z, sample)
            samples.append(sample)
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
    k_sketch = min(num_matvecs // 3, n, max_sketch(n, op.dtype))
    k_probe = num_matvecs - 2 * k_sketch
    dt, dev = op.dtype, op.device
    exact = torch.zeros((), dtype=dt, device=dev)
    exact_rows = torch.zeros(n if spec else 0, dtype=dt, device=dev)  # diag(A Q Qᵀ), per block
    samples: list[Tensor] = []
    block_samples: dict[str, list[Tensor]] = {b: [] for b in spec}
    with progress_bar(num_matvecs, "trace (hutch++)", progress) as bar, op.fixed():
        Q = torch.empty(k_sketch, n, dtype=dt, device=dev)  # the sketch A S, as rows
        for start in range(0, k_sketch, chunk_size):
            c = min(chunk_size, k_sketch - start)
            Q[start : start + c] = op.matmat(probe_columns(op, c, probes, generator)).T
            bar.update(c)
        _orthonormalise_rows(Q)
        for start in range(0, k_sketch, chunk_size):
            Qc = Q[start : start + chunk_size].T
            QAQ = Qc * op.matmat(Qc)
            exact += QAQ.sum()  # tr(Qᵀ A Q)
            if spec:
                exact_rows += QAQ.sum(dim=1)
            del QAQ
            bar.update(Qc.shape[1])
        used = 0
        while used < k_probe:
            c = min(chunk_size, k_probe - used)
            Z = probe_columns(op, c, probes, generator)
            Zp = torch.addmm(Z.T, Z.T @ Q.T, Q, alpha=-1.0).T  # (I - QQᵀ) Z, as rows
            AZp = op.matmat(Zp)
            samples.append((Zp * AZp).sum(dim=0))
            for b, slices in spec.items():
                block_samples[b].append(block_sum(Z * AZp, slices))
            del Zp, AZp
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
    chunk_size = options.get("chunk_size")
    chunk_size = default_chunk_size(op.shape[0]) if chunk_size is None else chunk_size
    check_probe_options(num_matvecs, probes, chunk_size)
    spec = resolve_blocks(op, options.get("blocks"))
    return probes, spec, chunk_size, options.get("generator"), options.get("progress", False)


def max_sketch(n: int, dtype: torch.dtype) -> int:
    """The most sketch vectors Hutch++ keeps: ``SKETCH_BYTES`` worth, at least one."""
    return max(1, SKETCH_BYTES // (n * torch.finfo(dtype).bits // 8))


def _orthonormalise_rows(Q: Tensor) -> None:
    """Orthonormalise the rows of ``Q`` in place (CGS2); a dependent row becomes zero.

    Rows that vanish (a rank-deficient sketch) leave ``QQᵀ`` a projector of lower rank, so the
    estimator stays unbiased.
    """
    for i in range(Q.shape[0]):
        q, before = Q[i], Q[i].norm()
        for _ in range(2):
            q.addmv_(Q[:i].T, Q[:i] @ q, alpha=-1.0)
        after = q.norm()
        q.mul_(torch.where(after > 1e-10 * before, 1.0 / after, torch.zeros_like(after)))
