"""Stochastic estimation of the diagonal of a symmetric operator."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.estimators._common import (
    check_probe_options,
    default_chunk_size,
    probe_columns,
    progress_bar,
    symmetric_operator,
)
from curvlab.estimators.results import Estimate
from curvlab.operators._checks import check_choice
from curvlab.operators._context import in_full_precision
from curvlab.operators.base import LinearOperator

__all__ = ["diagonal", "exact_diagonal"]


def exact_diagonal(op: LinearOperator) -> Tensor:
    """The exact diagonal of an operator that provides one (dense matrices, GGN operators, and
    scaled, summed, transposed or counted wrappers of those), see
    :meth:`LinearOperator.exact_diagonal <curvlab.operators.LinearOperator.exact_diagonal>`.

    Raises:
        NoExactDiagonalError: the operator has no exact diagonal (the message names the
            alternatives).
    """
    return op.exact_diagonal()


@in_full_precision
def diagonal(
    A: LinearOperator | Tensor,
    num_matvecs: int = 100,
    *,
    method: str = "hutchinson",
    probes: str = "rademacher",
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Estimate:
    r"""Estimate :math:`\operatorname{diag}(A)` by Hutchinson's diagonal estimator.

    .. math:: \hat d = \frac1m \sum_{i=1}^m z_i \odot A z_i

    (Bekas, Kokiopoulou, Saad 2007). With Rademacher probes entry ``j`` of each sample is
    :math:`a_{jj} + \sum_{l \ne j} a_{jl} z_j z_l`, so it is unbiased with variance
    :math:`\sum_{l\ne j} a_{jl}^2` per probe — exact for a diagonal matrix. Probes are streamed in
    chunks (memory independent of ``m``); the per-coordinate standard error is the sample one.

    With ``method="exact"`` an operator that knows its diagonal in closed form
    (:meth:`GGNOperator.exact_diagonal <curvlab.operators.GGNOperator.exact_diagonal>`, a dense
    tensor) returns it with zero standard error and ``num_matvecs=0``.

    Args:
        A: a symmetric operator or dense symmetric tensor.
        num_matvecs: number of probes ``m``.
        method: ``"hutchinson"`` (default) or ``"exact"``.
        probes: ``"rademacher"`` or ``"gaussian"``.
        chunk_size: probes multiplied per operator call; ``None`` picks it from ``n`` (as
            :func:`~curvlab.trace`).
        generator: source of the probes.
        progress: show a progress bar.

    Returns:
        :class:`~curvlab.estimators.results.Estimate` with ``value`` and ``std_error`` of shape ``[n]``.
    """
    op = symmetric_operator(A, "diagonal")
    if check_choice(method, ("hutchinson", "exact"), "diagonal method") == "exact":
        exact = exact_diagonal(op)
        return Estimate(exact, torch.zeros_like(exact), 0)
    n = op.shape[0]
    chunk_size = default_chunk_size(n) if chunk_size is None else chunk_size
    check_probe_options(num_matvecs, probes, chunk_size)
    total = torch.zeros(n, dtype=op.dtype, device=op.device)
    total_sq = torch.zeros_like(total)
    used = 0
    with progress_bar(num_matvecs, "diagonal", progress) as bar, op.fixed():
        while used < num_matvecs:
            c = min(chunk_size, num_matvecs - used)
            Z = probe_columns(op, c, probes, generator)
            S = Z * op.matmat(Z)
            total += S.sum(dim=1)
            total_sq += (S * S).sum(dim=1)
            used += c
            bar.update(c)
    mean = total / used
    if used > 1:
        var = (total_sq - used * mean * mean).clamp_min(0) / (used - 1)
        se = var.sqrt() / math.sqrt(used)
    else:
        se = torch.full_like(mean, math.inf)
    return Estimate(mean, se, used)
