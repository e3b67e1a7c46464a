"""Per-layer curvature figures: HAWQ-V2 trace sensitivity and per-block top eigenvalues."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.estimators.eigen import eigsh
from curvlab.estimators.results import LayerSensitivity
from curvlab.estimators.trace import trace
from curvlab.operators._context import in_full_precision
from curvlab.operators.curvature import CurvatureOperator
from curvlab.operators.hessian import HessianOperator

__all__ = ["layer_sensitivity"]


@in_full_precision
def layer_sensitivity(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Iterable[Tensor | str] | None = None,
    by: str = "module",
    num_matvecs: int = 100,
    method: str = "hutchinson",
    top_eigenvalue: bool = True,
    eig_tol: float = 1e-3,
    operator: CurvatureOperator | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> LayerSensitivity:
    r"""Per-block Hessian trace, HAWQ-V2 sensitivity :math:`\operatorname{tr}(H_i)/n_i`, and top eigenvalue.

    All block traces come from one probe set on the full Hessian (``num_matvecs`` products), as
    :math:`\operatorname{tr}(H_{ii}) \approx \frac1m\sum_k z_{k,i}^\top (H z_k)_i`; they add up to the
    full trace estimate. The top eigenvalue of each diagonal block :math:`H_{ii}` (HAWQ v1's
    sensitivity) comes from :func:`~curvlab.eigsh` on the block operator, whose products only
    differentiate that block's parameters.

    Args:
        model, loss_fn, data, params: as :class:`~curvlab.operators.HessianOperator`.
        by: ``"module"`` (weight and bias of a layer together) or ``"param"``.
        num_matvecs: probes for the traces.
        method: ``"hutchinson"`` (default), ``"hutch++"``, or ``"exact"`` with a
            :class:`~curvlab.GGNOperator` as ``operator`` (exact diagonals: for piecewise-linear
            networks these are the exact per-layer *Hessian* traces, at ~5 HVPs of cost).
        top_eigenvalue: also compute each block's top eigenvalue.
        eig_tol: relative residual tolerance of those eigenvalues.
        operator: a prebuilt curvature operator to use instead of the Hessian (its graph cache
            included), e.g. a GGN operator.
        generator: source of the probes and Lanczos start vectors.
        progress: show progress bars.

    Returns:
        :class:`~curvlab.estimators.results.LayerSensitivity` (``.table()`` for people,
        ``.rows()`` for programs).

    References:
        Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization", NeurIPS 2020,
        arXiv 1911.03852; Dong et al., "HAWQ", ICCV 2019, arXiv 1905.03696.
    """
    H = operator if operator is not None else HessianOperator(model, loss_fn, data, params)
    groups = H.blocks(by)
    est = trace(H, num_matvecs, method=method, blocks=by, generator=generator, progress=progress)
    matvecs = est.num_matvecs
    names, sizes, traces, errors, tops = [], [], [], [], []
    for name, members in groups.items():
        names.append(name)
        sizes.append(sum(H.param_space.sizes[H.param_space.names.index(p)] for p in members))
        traces.append(float(est.blocks[name].value))
        errors.append(float(est.blocks[name].std_error))
        if top_eigenvalue:
            block = H.block(members)
            pairs = eigsh(block, k=1, tol=eig_tol, generator=generator)
            tops.append(float(pairs.values[0]))
            matvecs += pairs.num_matvecs
        else:
            tops.append(float("nan"))
    return LayerSensitivity(
        names=tuple(names),
        num_params=tuple(sizes),
        trace=tuple(traces),
        trace_std_error=tuple(errors),
        top_eigenvalue=tuple(tops),
        num_matvecs=matvecs,
    )
