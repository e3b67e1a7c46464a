"""Batches of data, and the weight each batch carries in the full-data loss.

An operator's ``data`` is either one ``(inputs, targets)`` batch or any re-iterable of such batches
(a list, a ``DataLoader``). The operator represents the curvature of the loss over *all* the data,
with the loss's own reduction:

* ``reduction="mean"``: the loss of the data set is the sum over all counted targets divided by the
  loss's own denominator over *all* the data, so batch ``b`` enters with weight ``w_b = D_b / Σ D``
  where ``D_b`` is what the loss divides by on batch ``b``: the number of target elements, or for
  ``nn.CrossEntropyLoss``/``nn.NLLLoss`` the sum of the class weights of the targets that are not
  ``ignore_index`` (padding, masked tokens). This is exact also when the last batch is smaller or
  masks a different number of targets (averaging batch means with equal weights is not). A batch
  whose targets are all ignored (``D_b = 0``) contributes nothing and is skipped.
* ``reduction="sum"``: every batch enters with weight 1.

Other loss callables count every target element once: to mask targets, use the loss modules (or
``F.cross_entropy``/``F.nll_loss`` with the default ``ignore_index=-100``), whose masks are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.errors import EmptyDataError, ShapeMismatchError

__all__ = ["BatchSource", "loss_denominator", "move_to", "target_weights"]

Batch = tuple[Any, Tensor]
_CLASS_FUNCTIONS = (F.cross_entropy, F.nll_loss)


def move_to(x: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors inside a tuple/list/dict, to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(move_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: move_to(v, device) for k, v in x.items()}
    return x


def _feature_shapes(x: Any) -> tuple[Any, ...]:
    """The shapes of the tensors inside ``x`` without their leading (batch) dimension."""
    if isinstance(x, Tensor):
        return (tuple(x.shape[1:]),)
    if isinstance(x, (tuple, list)):
        return tuple(s for v in x for s in _feature_shapes(v))
    if isinstance(x, dict):
        return tuple((k, _feature_shapes(x[k])) for k in sorted(x, key=str))
    return ()


def class_loss_options(loss_fn: Any) -> tuple[int, Tensor | None] | None:
    """``(ignore_index, class weight)`` of a class-index loss (cross-entropy, NLL), else ``None``."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return int(loss_fn.ignore_index), loss_fn.weight
    if any(loss_fn is f for f in _CLASS_FUNCTIONS):
        return -100, None
    return None


def target_weights(loss_fn: Any, targets: Tensor) -> Tensor | None:
    """Per-target weights of a class-index loss: 0 at ``ignore_index``, else the class weight.

    Returns ``None`` for every other loss and for class-probability targets, where every target
    counts once.
    """
    options = class_loss_options(loss_fn)
    if options is None or targets.dtype.is_floating_point:
        return None
    ignore, weight = options
    counted = targets != ignore
    if weight is None:
        return counted.to(torch.get_default_dtype())
    weight = weight.to(targets.device)
    idx = torch.where(counted, targets, torch.zeros_like(targets)).clamp(0, weight.numel() - 1)
    return torch.where(
        counted, weight[idx], torch.zeros((), dtype=weight.dtype, device=weight.device)
    )


def loss_denominator(loss_fn: Any, targets: Tensor) -> float:
    """What ``loss_fn`` with ``reduction="mean"`` divides the summed loss by on these targets.

    The sum of :func:`target_weights` for class-index losses; the number of examples times the
    spatial positions for class-probability targets; the number of target elements otherwise.
    """
    weights = target_weights(loss_fn, targets)
    if weights is not None:
        return float(weights.sum())
    if class_loss_options(loss_fn) is not None and targets.ndim > 1:
        return float(targets.numel() // targets.shape[1])
    return float(targets.numel())


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
        loss_fn: the loss, whose denominator (``ignore_index``, class weights) sets the weights.

    Attributes:
        denominators: ``D_b`` of every batch (see the module docstring).
        total: ``Σ D_b``, what the mean loss over all the data divides by.
        feature_shapes: the input shapes of every batch without the batch dimension.

    Raises:
        EmptyDataError: no batch, a batch with no example, or every target ignored.
    """

    def __init__(self, data: Any, reduction: str = "mean", loss_fn: Any = None) -> None:
        self.reduction = reduction
        self.loss_fn = loss_fn
        self.single = _is_single_batch(data)
        self._data: Iterable[Batch] = [tuple(data)] if self.single else data  # type: ignore[list-item]
        if isinstance(self._data, Iterator):
            self._data = list(self._data)  # a one-shot iterator cannot be read more than once
        self.sizes: list[int] = []
        self.denominators: list[float] = []
        self.feature_shapes: list[tuple[Any, ...]] = []
        for batch in self._iter_raw():
            self.sizes.append(self._size(batch))
            self.denominators.append(loss_denominator(loss_fn, batch[1]))
            self.feature_shapes.append(_feature_shapes(batch[0]))
        if not self.sizes:
            raise EmptyDataError(
                "data holds no batch; pass (inputs, targets) or a non-empty iterable of such batches"
            )
        self.total = sum(self.denominators)
        if self.total == 0:
            raise EmptyDataError(
                "every target is ignored (ignore_index) or has class weight 0, so the loss has "
                "nothing to average; pass data with at least one counted target"
            )

    @staticmethod
    def _size(batch: Any) -> int:
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
        return len(self.sizes)

    def __iter__(self) -> Iterator[tuple[Any, Tensor, float]]:
        """Yield ``(inputs, targets, weight)`` for every batch that has a counted target."""
        seen = 0
        for i, batch in enumerate(self._iter_raw()):
            if i >= len(self.sizes) or self._size(batch) != self.sizes[i]:
                raise ShapeMismatchError(
                    "the data yielded different batches than when the operator was built "
                    "(a shuffling DataLoader or drop_last changes the matrix between products); "
                    "use a fixed list of batches or shuffle=False"
                )
            seen += 1
            if self.denominators[i] == 0:
                continue  # every target ignored: no contribution (its mean loss would be 0/0)
            weight = self.denominators[i] / self.total if self.reduction == "mean" else 1.0
            yield batch[0], batch[1], weight
        if seen != len(self.sizes):
            raise ShapeMismatchError(
                f"the data yielded {seen} batches, {len(self.sizes)} when the operator was built"
            )
