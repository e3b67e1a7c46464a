"""The Hessian of a model's loss over a data set, as a matrix-free operator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from curvlab.operators._context import full_precision
from curvlab.operators.curvature import CurvatureOperator

__all__ = ["HessianOperator"]


class _HessianLinearisation:
    __slots__ = ("grads", "idx")

    def __init__(self, grads: list[Tensor], idx: list[int]) -> None:
        self.grads = grads  # gradients built with create_graph=True
        self.idx = idx  # positions of the gradients that depend on the parameters


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of the loss over all the data.

    .. math::

        L(\theta) = \sum_b w_b\, \ell\big(f_\theta(x_b), y_b\big), \qquad
        H v = \nabla_\theta \big\langle \nabla_\theta L(\theta), v \big\rangle

    with batch weights :math:`w_b` that reproduce the loss's own reduction over the whole data set
    (``mean``: :math:`w_b = D_b / \sum_{b'} D_{b'}` with :math:`D_b` what the loss divides by on
    batch ``b``: the number of target elements, or for cross-entropy/NLL the summed class weights
    of the targets that are not ``ignore_index``; exact also when the last batch is smaller or
    masks more targets, and a batch with every target ignored is skipped; ``sum``:
    :math:`w_b = 1`). Products are reverse-over-reverse (double backward). The gradient graph of
    each batch is built once per product call and shared by all the columns of ``V``; with
    ``cache_graph=True`` (the default for a single batch, and for several batches whose graphs fit
    1 GiB) it is kept across calls, so each further HVP costs one backward pass. The cache is rebuilt when a parameter is updated in place, its
    ``.data`` reassigned or the parameter replaced on its module (see
    :class:`~curvlab.operators.CurvatureOperator`).

    The operator is the curvature of the model in full precision, in its parameters' dtype: its
    forwards, products and the estimators built on it run with any active ``torch.autocast``
    disabled (a bfloat16 autocast would otherwise give the curvature of a different, rounded
    function, and break the estimators' linear algebra). Its forwards run scaled-dot-product
    attention on SDPA's math kernel (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, only
    around the operator's own forwards): the fused kernels have no double backward, and the math
    kernel computes what eager attention computes. A ``torch.compile``-d model (which cannot be
    differentiated twice) or a (Distributed)DataParallel wrapper is unwrapped to the module it
    holds, with an :class:`~curvlab.operators.UnwrappedModelWarning`.

    Args:
        model: any ``nn.Module``; a compiled or DDP-wrapped one is unwrapped (see above).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; any differentiable loss.
        data: one batch or an iterable of them (e.g. a ``DataLoader`` without shuffling). A
            batch is an ``(inputs, targets)`` pair or a Hugging Face style dict: the model is
            called as ``model(**inputs)`` with the dict less ``"labels"``, and ``"labels"`` are
            the targets. Dict inputs in a pair are passed as keywords too.
        params: parameters (tensors or names) to differentiate; ``None`` = all that require grad.
        mode: ``"eval"`` (default) evaluates the model in evaluation mode (dropout off, BatchNorm
            running statistics) and restores its flags afterwards, so the operator is a fixed
            matrix; ``"train"`` or ``"as-is"`` use training behaviour (BatchNorm normalises by
            batch statistics, its running statistics are left unchanged) and warn that the
            operator is then not fixed.
        reduction: ``"mean"``/``"sum"`` for a loss callable without a ``reduction`` attribute.
        cache_graph: keep the per-batch gradient graphs between products (memory for speed).
            ``None`` (default): always for one batch; for several when their graphs are
            estimated to fit :data:`~curvlab.operators.curvature.GRAPH_CACHE_BYTES` (1 GiB; the
            rule is in :class:`~curvlab.operators.CurvatureOperator`).
        check_finite: raise :class:`~curvlab.errors.NonFiniteError` on NaN/inf losses or products.
        vectorize: multiply all columns of ``V`` in one batched double backward
            (``is_grads_batched``) instead of a loop of backward passes over the shared graph.
            On CPU the loop measured faster (digits MLP: 1.6 vs 1.8 ms per vector at k = 8), so
            it is off by default; on GPUs, where per-call overhead dominates, try it.
        output_fn: ``output_fn(model_output) -> Tensor``, the tensor the loss takes. Default: a
            tensor output as it is, a ``ModelOutput`` (or a dict/object with ``logits``) its
            ``logits``. For per-token cross-entropy on ``[B, T, C]`` logits use
            ``lambda out: out.logits.transpose(1, 2)`` (``[B, C, T]``, targets ``[B, T]``); for
            a causal LM :func:`~curvlab.operators.shift_logits`.
        target_fn: ``target_fn(targets) -> Tensor``, applied to every batch's targets before
            the loss and the batch weights see them (masked targets, ``ignore_index``, are
            counted after it); for a causal LM :func:`~curvlab.operators.shift_labels`. The
            two functions are separate because the targets are counted when the operator is
            built, without running the model.

    Raises:
        LossNotScalarError: the loss is not a scalar (e.g. ``reduction='none'``).
        UnsupportedLossError: ``loss_fn`` is not callable.
        UnknownOptionError: ``mode`` or ``reduction`` is not one of the accepted names.
        EmptyDataError: no batch, an empty batch, or every target ignored.
        ShapeMismatchError: the output does not fit the loss (an element-wise loss needs targets
            of the output's shape; the message names ``output_fn=``), a batch's inputs do not
            fit the model, or a batch is neither a pair nor a dict.
        MissingLabelsError: a dict batch has no ``"labels"``.
        ParameterError, NonFiniteError, InvalidArgumentError.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> H = HessianOperator(model, nn.MSELoss(), (X, y))
        >>> H.shape
        (4, 4)
        >>> bool(torch.allclose(H.to_dense(), H.to_dense().T))
        True
    """

    is_symmetric = True
    is_psd = False
    merge_batches = True

    def _linearise(self, inputs: Any, targets: Tensor, weight: float) -> _HessianLinearisation:
        with torch.enable_grad():
            loss = self._loss(self._forward(inputs), targets, weight)
            grads = self._grad(loss, None, create_graph=True)
        idx = [i for i, g in enumerate(grads) if g.requires_grad]
        return _HessianLinearisation(grads, idx)

    def _apply(self, lin: _HessianLinearisation, V: Tensor) -> Tensor:
        if not lin.idx:
            return torch.zeros_like(V)
        if self.vectorize and V.shape[1] > 1:
            return self._batched_products(lin, V)
        # columns in and out as contiguous rows: no copy for V = Z.T of row-major probes, and
        # each product is written in place (the result is the transposed view of the rows)
        return self._rows_products(lin, V.T.contiguous(), times=False).T

    def _batched_products(self, lin: _HessianLinearisation, V: Tensor) -> Tensor:
        """``H V`` for all columns of ``V`` in one vmapped double backward (``vectorize``)."""
        with torch.enable_grad():
            cols_v = self._columns(V)
            outputs = [lin.grads[i] for i in lin.idx]
            hv = self._grad(outputs, [cols_v[i] for i in lin.idx], batched=True)
        return self._flatten_columns(hv)

    def _row_pieces(
        self, lin: _HessianLinearisation, rows: Tensor
    ) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """For each row ``z`` of ``rows``: ``z`` and ``H z`` as one piece per parameter."""
        outputs = [lin.grads[i] for i in lin.idx]
        for j in range(rows.shape[0]):
            pieces = self.param_space.split(rows[j])
            with torch.enable_grad():
                hv = self._grad(outputs, [pieces[i] for i in lin.idx])
            yield pieces, hv

    def _rows_products(self, lin: _HessianLinearisation, rows: Tensor, times: bool) -> Tensor:
        """``H z`` for each row ``z`` of ``rows``, or with ``times`` ``z ⊙ Hz``, as rows."""
        out = torch.empty_like(rows)
        for j, (pieces, hv) in enumerate(self._row_pieces(lin, rows)):
            if not times:
                torch.cat([h.reshape(-1) for h in hv], out=out[j])
                continue
            for z, h, o in zip(pieces, hv, self.param_space.split(out[j])):
                torch.mul(z, h, out=o)
        return out

    def _one_graph_unchecked(self) -> bool:
        """Whether products may skip the flat ``Hz``: one graph (one batch, or batches merged into
        one), no per-product check to run (``fixed(check_products=False)`` or
        ``check_finite=False``) and the column-by-column path."""
        one_graph = self.data.single or len(self._cache or ()) == 1
        checked = self.check_finite and not self._unchecked
        return not (self.vectorize or checked or not one_graph)

    def _probe_products(self, rows: Tensor) -> Tensor:
        """``z ⊙ Hz`` per row, multiplied straight from the pieces autograd returns.

        Where :meth:`_one_graph_unchecked`, no flat ``Hz`` is written and read again (that copy
        measured 6% of a product at 1M parameters). The products are the same numbers either way.
        """
        if not self._one_graph_unchecked():
            return super()._probe_products(rows)
        with full_precision():
            (lin,) = self._linearisations()
            if not lin.idx:
                return torch.zeros_like(rows)
            return self._rows_products(lin, rows, times=True)

    def _probe_quadratics(self, rows: Tensor) -> Tensor:
        """``zᵀHz`` per row as the sum of one dot product per parameter tensor, from the pieces
        autograd returns (where :meth:`_one_graph_unchecked`): no ``z ⊙ Hz`` is written (its
        multiply and sum measured 17% of a product at 5M parameters)."""
        if not self._one_graph_unchecked():
            return super()._probe_quadratics(rows)
        with full_precision():
            (lin,) = self._linearisations()
            if not lin.idx:
                return rows.new_zeros(rows.shape[0])
            sums = [
                torch.stack([torch.dot(z.reshape(-1), h.reshape(-1)) for z, h in zip(*row)]).sum()
                for row in self._row_pieces(lin, rows)
            ]
            return torch.stack(sums)
