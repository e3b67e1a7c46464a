"""Batches of data, and the weight each batch carries in the full-data loss.

An operator's ``data`` is either one batch or any re-iterable of batches (a list, a ``DataLoader``).
A batch is an ``(inputs, targets)`` pair or, in the Hugging Face style, a dict whose ``"labels"``
entry holds the targets and whose other entries are the model's keyword inputs (``model(**inputs)``;
dict inputs inside a pair are passed the same way). A ``target_fn`` maps every batch's targets
before the loss and the weights below see them (e.g. the causal shift, :func:`shift_labels`). The
operator represents the curvature of the loss over *all* the data,
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

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.errors import EmptyDataError, MissingLabelsError, ShapeMismatchError

__all__ = [
    "LABELS",
    "BatchSource",
    "loss_denominator",
    "move_to",
    "shift_labels",
    "shift_logits",
    "split_batch",
    "target_weights",
]

Batch = tuple[Any, Tensor]
TargetFn = Callable[[Tensor], Tensor]
LABELS = "labels"
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


def shift_logits(outputs: Any) -> Tensor:
    """Causal-LM ``output_fn``: the logits of every position but the last, as ``[B (T-1), C]``.

    Position ``t`` predicts token ``t + 1``; pair with :func:`shift_labels` as ``target_fn`` (this
    is the shift Hugging Face causal LMs apply to compute their own loss). Takes a ``ModelOutput``
    (its ``.logits``) or a ``[B, T, C]`` tensor.
    """
    logits = outputs if isinstance(outputs, Tensor) else outputs.logits
    return logits[:, :-1].reshape(-1, logits.shape[-1])


def shift_labels(labels: Tensor) -> Tensor:
    """Causal-LM ``target_fn``: the labels of every position but the first, as ``[B (T-1)]``."""
    return labels[:, 1:].reshape(-1)


def split_batch(batch: Any, target_fn: TargetFn | None = None) -> Batch:
    """``(inputs, targets)`` of a pair or of a dict with ``"labels"``; ``target_fn`` applied.

    Raises:
        MissingLabelsError: a dict batch has no ``"labels"``.
        ShapeMismatchError: the batch is neither, or its targets are not a tensor.
    """
    if isinstance(batch, Mapping):
        if batch.get(LABELS) is None:
            raise MissingLabelsError(
                f"a dict batch needs the targets under {LABELS!r}, got keys "
                f"{sorted(map(str, batch))}; add them (batch['labels'] = input_ids for a causal "
                "LM, with target_fn=shift_labels and output_fn=shift_logits), or pass "
                "(inputs, targets) pairs"
            )
        inputs: Any = {k: v for k, v in batch.items() if k != LABELS}
        targets = batch[LABELS]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    else:
        raise ShapeMismatchError(
            f"each batch must be a pair (inputs, targets) or a dict with {LABELS!r}, got "
            f"{type(batch).__name__}"
        )
    if not isinstance(targets, Tensor):
        raise ShapeMismatchError(f"targets must be a tensor, got {type(targets).__name__}")
    if target_fn is not None:
        targets = target_fn(targets)
        if not isinstance(targets, Tensor):
            raise ShapeMismatchError(
                f"target_fn returned {type(targets).__name__}; it must return the targets tensor"
            )
    return inputs, targets


def _is_single_batch(data: Any) -> bool:
    return isinstance(data, Mapping) or (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and not isinstance(data[0], (tuple, list))
    )


class BatchSource:
    """Iterates the batches of ``data`` with their weights in the full-data loss.

    Args:
        data: one batch (a pair or a dict with ``"labels"``) or an iterable of them.
        reduction: ``"mean"`` or ``"sum"``, the reduction of the loss over examples.
        loss_fn: the loss, whose denominator (``ignore_index``, class weights) sets the weights.
        target_fn: maps every batch's targets before they are counted and used.

    Attributes:
        denominators: ``D_b`` of every batch (see the module docstring).
        total: ``Σ D_b``, what the mean loss over all the data divides by.
        feature_shapes: the input shapes of every batch without the batch dimension.

    Raises:
        EmptyDataError: no batch, a batch with no example, or every target ignored.
        MissingLabelsError: a dict batch without ``"labels"``.
    """

    def __init__(
        self,
        data: Any,
        reduction: str = "mean",
        loss_fn: Any = None,
        target_fn: TargetFn | None = None,
    ) -> None:
        self.reduction = reduction
        self.loss_fn = loss_fn
        self.target_fn = target_fn
        self.single = _is_single_batch(data)
        self._data: Iterable[Any] = [data] if self.single else data
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
    def _size(batch: Batch) -> int:
        if batch[1].numel() == 0:
            raise EmptyDataError("a batch holds no example (its targets are empty); drop it")
        return int(batch[1].numel())

    def _iter_raw(self) -> Iterator[Batch]:
        """Every batch as ``(inputs, targets)``, with ``target_fn`` applied."""
        for batch in self._data:
            yield split_batch(batch, self.target_fn)

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
