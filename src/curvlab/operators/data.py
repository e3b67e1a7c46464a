"""Batches of data, and the weight each batch carries in the full-data loss.

An operator's ``data`` is either one ``(inputs, targets)`` batch or any re-iterable of such batches
(a list, a ``DataLoader``). The operator represents the curvature of the loss over *all* the data,
with the loss's own reduction:

* ``reduction="mean"``: the loss of the data set is the mean over all target elements, so batch
  ``b`` enters with weight ``w_b = numel(targets_b) / Σ_b numel(targets_b)``. This is exact also when
  the last batch is smaller (averaging batch means with equal weights is not).
* ``reduction="sum"``: every batch enters with weight 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from curvlab.errors import EmptyDataError, ShapeMismatchError

__all__ = ["BatchSource", "move_to"]

Batch = tuple[Any, Tensor]


def move_to(x: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors inside a tuple/list/dict, to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(move_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: move_to(v, device) for k, v in x.items()}
    return x


def _is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and not isinstance(data[0], (tuple, list))
    )


class BatchSource:
    """Iterates the batches of ``data`` with their weights in the full-data loss.

    Args:
        data: one ``(inputs, targets)`` batch or an iterable of them.
        reduction: ``"mean"`` or ``"sum"``, the reduction of the loss over examples.

    Raises:
        EmptyDataError: no batch, or a batch with no example.
    """

    def __init__(self, data: Any, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.single = _is_single_batch(data)
        self._data: Iterable[Batch] = [tuple(data)] if self.single else data  # type: ignore[list-item]
        if isinstance(self._data, Iterator):
            self._data = list(self._data)  # a one-shot iterator cannot be read more than once
        counts = [self._count(b) for b in self._iter_raw()]
        if not counts:
            raise EmptyDataError(
                "data holds no batch; pass (inputs, targets) or a non-empty iterable of such batches"
            )
        self.counts = counts
        self.total = sum(counts)
        self.num_examples = sum(self._examples(b) for b in self._iter_raw())

    @staticmethod
    def _examples(batch: Batch) -> int:
        return int(batch[1].shape[0]) if batch[1].ndim > 0 else 1

    def _count(self, batch: Any) -> int:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ShapeMismatchError(
                f"each batch must be a pair (inputs, targets), got {type(batch).__name__}"
            )
        targets = batch[1]
        if not isinstance(targets, Tensor):
            raise ShapeMismatchError(f"targets must be a tensor, got {type(targets).__name__}")
        if targets.numel() == 0:
            raise EmptyDataError("a batch holds no example (its targets are empty); drop it")
        return int(targets.numel())

    def _iter_raw(self) -> Iterator[Batch]:
        yield from self._data  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.counts)

    def __iter__(self) -> Iterator[tuple[Any, Tensor, float]]:
        """Yield ``(inputs, targets, weight)`` for every batch."""
        seen = 0
        for i, batch in enumerate(self._iter_raw()):
            n = self._count(batch)
            if i >= len(self.counts) or n != self.counts[i]:
                raise ShapeMismatchError(
                    "the data yielded different batches than when the operator was built "
                    "(a shuffling DataLoader or drop_last changes the matrix between products); "
                    "use a fixed list of batches or shuffle=False"
                )
            seen += 1
            weight = n / self.total if self.reduction == "mean" else 1.0
            yield batch[0], batch[1], weight
        if seen != len(self.counts):
            raise ShapeMismatchError(
                f"the data yielded {seen} batches, {len(self.counts)} when the operator was built"
            )
