"""Small helpers shared by the stochastic estimators."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab.errors import InvalidArgumentError, NotSymmetricError
from curvlab.estimators.probes import PROBES, sample_probes
from curvlab.operators._checks import check_choice, check_positive_int
from curvlab.operators.base import LinearOperator, as_operator

__all__ = [
    "BlockSpec",
    "check_probe_options",
    "check_samples",
    "default_chunk_size",
    "probe_columns",
    "probe_rows",
    "progress_bar",
    "resolve_blocks",
    "symmetric_operator",
]

BlockSpec = Mapping[str, Sequence[slice]]


def symmetric_operator(A: LinearOperator | Tensor, who: str) -> LinearOperator:
    """``A`` as an operator, or :class:`NotSymmetricError` if it is not declared symmetric."""
    op = as_operator(A)
    if op.shape[0] != op.shape[1] or not op.is_symmetric:
        raise NotSymmetricError(
            f"{who} needs a symmetric operator, got {op!r}; for a dense matrix pass (M + M.T) / 2, "
            "for an operator declare is_symmetric only if it is"
        )
    return op


def resolve_blocks(op: LinearOperator, blocks: str | BlockSpec | None) -> dict[str, list[slice]]:
    """Turn ``"module"``/``"param"`` (for operators with a ``param_space``) or a mapping into slices."""
    if blocks is None:
        return {}
    if isinstance(blocks, str):
        space = getattr(op, "param_space", None)
        if space is None:
            raise InvalidArgumentError(
                f"blocks={blocks!r} needs a curvature operator with a param_space; pass a mapping "
                "of block name -> list of slices for other operators"
            )
        return {
            name: [space.slice_of(p) for p in members]
            for name, members in space.groups(blocks).items()
        }
    return {name: list(slices) for name, slices in blocks.items()}


def check_probe_options(num_matvecs: Any, probes: Any, chunk_size: Any) -> int:
    """Validate a stochastic estimator's budget, probe kind and chunk size; return the budget.

    Raises:
        InvalidArgumentError: ``num_matvecs`` or ``chunk_size`` is not an integer ``>= 1``.
        UnknownOptionError: ``probes`` is not a known probe kind.
    """
    check_choice(probes, PROBES, "probe kind")
    check_positive_int(chunk_size, "chunk_size")
    return check_positive_int(num_matvecs, "num_matvecs")


def default_chunk_size(n: int) -> int:
    """Probes per product call when none is given: 8 up to 2^18 parameters, then ``2^21 / n``.

    A block of columns shares one graph build, which matters for small operators and for
    operators without a cached graph; from about a million parameters a column costs as much
    alone as in a block, and every column in flight costs its vectors of memory.
    """
    return max(1, min(8, (1 << 21) // max(n, 1)))


def probe_columns(
    op: LinearOperator, c: int, probes: str, generator: torch.Generator | None
) -> Tensor:
    """``c`` probe columns ``[n, c]`` stored as contiguous rows (what the products stream over)."""
    return probe_rows(op, c, probes, generator).T


def probe_rows(
    op: LinearOperator,
    c: int,
    probes: str,
    generator: torch.Generator | None,
    out: Tensor | None = None,
) -> Tensor:
    """``c`` probes as the contiguous rows of a ``[c, n]`` matrix (:func:`probe_columns`'s
    storage), written into ``out`` (a reused ``[c, n]`` buffer) if given."""
    n = op.shape[0]
    return sample_probes(
        c, n, probes, generator=generator, dtype=op.dtype, device=op.device, out=out
    )


def check_samples(op: LinearOperator, Z: Tensor, samples: Tensor) -> None:
    """Raise the error of ``op``'s own product check if the ``samples`` ``zᵀAz`` are not finite.

    For estimators that run their products with ``op.fixed(check_products=False)``: a NaN/inf
    entry of ``Az`` makes ``zᵀAz`` NaN/inf (``0 · inf`` is NaN), so the samples of a chunk of
    probes (the rows of ``Z``) show it without a pass over each product. Only then are the
    chunk's products computed again with the operator's check, which raises its
    :class:`~curvlab.errors.NonFiniteError`; a sample that merely overflowed raises nothing, as
    before.
    """
    if not bool(torch.isfinite(samples).all()):
        with op.fixed():
            op.matmat(Z.T)


def block_sum(x: Tensor, slices: Sequence[slice]) -> Tensor:
    """Sum of the rows of ``x`` (``[n]`` or ``[n, k]``) inside the given slices."""
    return sum((x[s].sum(dim=0) for s in slices), torch.zeros_like(x[0]))


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr, or a no-op object when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="hvp")
