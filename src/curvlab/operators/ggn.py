"""The generalised Gauss-Newton matrix of a model's loss, as a matrix-free operator."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.operators._losses import LossCurvature, loss_curvature
from curvlab.operators._model import CurvatureOperator, Mode

__all__ = ["GGNOperator", "OutputSpaceOperator"]


class _OutputLinearisation:
    """Cached graphs of one batch: ``outputs = f(θ)`` and ``Jᵀu`` (linear in a dummy ``u``)."""

    __slots__ = ("dummy", "extra", "idx", "jt_u", "outputs", "scale")

    def __init__(
        self, outputs: Tensor, dummy: Tensor, jt_u: list[Tensor], idx: list[int], scale: float
    ) -> None:
        self.outputs = outputs
        self.dummy = dummy
        self.jt_u = jt_u
        self.idx = idx
        self.scale = scale
        self.extra: Any = None


class OutputSpaceOperator(CurvatureOperator):
    r"""Base of operators of the form :math:`\sum_b J_b^\top M_b J_b` with ``J_b`` the Jacobian of
    the model's outputs on batch ``b`` and ``M_b`` a PSD matrix in output space.

    ``J v`` is computed with the double-vjp trick on a cached graph (``Jᵀu`` is linear in ``u``, so
    differentiating ``⟨Jᵀu, v⟩`` w.r.t. ``u`` gives ``J v``), ``Jᵀ w`` with one vjp. Subclasses define
    ``_output_matmul(lin, JV)`` returning ``M_b J V`` (columns in the leading dimension).
    """

    is_symmetric = True
    is_psd = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Iterable[Tensor | str] | None = None,
        *,
        mode: Mode = "eval",
        reduction: str | None = None,
        cache_graph: bool | None = None,
        check_finite: bool = True,
        vectorize: bool = False,
    ) -> None:
        self.curvature: LossCurvature = loss_curvature(loss_fn)
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            mode=mode,
            reduction=reduction,
            cache_graph=cache_graph,
            check_finite=check_finite,
            vectorize=vectorize,
        )

    def _linearise(self, inputs: Any, targets: Tensor, weight: float) -> _OutputLinearisation:
        with torch.enable_grad():
            outputs = self._forward(inputs)
            # the loss is evaluated once: it checks shapes, scalar-ness and finiteness
            self._loss(outputs.detach(), targets, weight)
            targets = targets.to(self.device)
            self.curvature.check(outputs, targets)
            dummy = torch.zeros_like(outputs, requires_grad=True)
            jt_u = self._grad(outputs, dummy, create_graph=True)
        idx = [i for i, g in enumerate(jt_u) if g.requires_grad]
        scale = weight * self.curvature.scale(outputs, self.reduction)
        lin = _OutputLinearisation(outputs, dummy, jt_u, idx, scale)
        lin.extra = self._batch_extra(lin, targets)
        return lin

    def _batch_extra(self, lin: _OutputLinearisation, targets: Tensor) -> Any:
        return None

    def _check_outputs(self, outputs: Tensor, targets: Tensor) -> None:
        self.curvature.check(outputs, targets)

    def _jvp(self, lin: _OutputLinearisation, v: Tensor) -> Tensor:
        pieces = self.param_space.split(v)
        (jv,) = torch.autograd.grad(
            [lin.jt_u[i] for i in lin.idx],
            lin.dummy,
            grad_outputs=[pieces[i] for i in lin.idx],
            retain_graph=True,
        )
        return jv

    def _output_matmul(self, lin: _OutputLinearisation, jv: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply(self, lin: _OutputLinearisation, V: Tensor) -> Tensor:
        if not lin.idx:
            return torch.zeros_like(V)
        if self.vectorize and V.shape[1] > 1:
            with torch.enable_grad():
                pieces = self._columns(V)
                (jv,) = torch.autograd.grad(
                    [lin.jt_u[i] for i in lin.idx],
                    lin.dummy,
                    grad_outputs=[pieces[i] for i in lin.idx],
                    retain_graph=True,
                    is_grads_batched=True,
                )
                w = torch.stack([self._output_matmul(lin, c) for c in jv.detach()])
                return self._flatten_columns(self._grad(lin.outputs, w, batched=True))
        cols = []
        with torch.enable_grad():
            for j in range(V.shape[1]):
                w = self._output_matmul(lin, self._jvp(lin, V[:, j]).detach())
                cols.append(self.param_space.flatten(self._grad(lin.outputs, w)))
        return torch.stack(cols, dim=1)


class GGNOperator(OutputSpaceOperator):
    r"""The generalised Gauss-Newton matrix :math:`G = \sum_b J_b^\top\, \nabla^2_{o} L_b\, J_b`.

    ``J_b`` is the Jacobian of the model outputs on batch ``b`` w.r.t. the chosen parameters and
    :math:`\nabla^2_o L_b` the Hessian of the (weighted) loss w.r.t. the outputs, in closed form:
    MSE :math:`2\kappa I`; cross-entropy :math:`\kappa(\operatorname{diag}p - pp^\top)` per position;
    BCE-with-logits :math:`\kappa\,\sigma(1-\sigma)`. ``κ`` is the reduction's normalisation times the
    batch weight, so :math:`G` is the GGN of the loss over the whole data set (mean or sum, as the
    loss says). ``G`` is symmetric PSD and equals the Hessian when the model is linear in θ.

    Arguments, mode and caching as :class:`~curvlab.operators.HessianOperator`.

    Raises:
        UnsupportedLossError: the loss is not MSE, cross-entropy or BCE-with-logits.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        >>> X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
        >>> G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
        >>> bool(torch.linalg.eigvalsh(G.to_dense()).min() > -1e-12)
        True
    """

    def _output_matmul(self, lin: _OutputLinearisation, jv: Tensor) -> Tensor:
        return lin.scale * self.curvature.hessian_matmul(lin.outputs.detach(), jv)
