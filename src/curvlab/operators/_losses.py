r"""Output-space curvature of the losses GGN and Fisher operators support.

For a loss :math:`L = \kappa \sum_e c_e\, \ell_e(o_e, y_e)` (``κ`` = one over the loss's denominator
over all the data, or 1 for a summed loss; ``c_e`` the weight of target ``e``: 0 at
``ignore_index``, the class weight otherwise, see :func:`curvlab.operators.data.target_weights`), we
need the output Hessian ``∇²_o L`` applied to a vector, a sample of the output gradient under labels
drawn from the model (Fisher), and the output gradient under the true labels (empirical Fisher).
Supported: MSE, cross-entropy (with ``ignore_index`` and non-negative class weights),
BCE-with-logits. Also here: the shape check of element-wise losses, which torch only warns about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.errors import ShapeMismatchError, UnsupportedLossError
from curvlab.operators.data import class_loss_options, target_weights

__all__ = ["LossCurvature", "check_target_shape", "loss_curvature"]

SUPPORTED = "nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss (or their functional forms)"

_ELEMENTWISE_MODULES = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
)
_ELEMENTWISE_FUNCTIONS = (
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.binary_cross_entropy,
    F.binary_cross_entropy_with_logits,
    F.soft_margin_loss,
)


def check_target_shape(loss_fn: Any, outputs: Tensor, targets: Tensor) -> None:
    """Refuse targets of an element-wise loss whose shape differs from the outputs'.

    torch broadcasts them with only a warning, which silently computes a different loss (an
    ``[N, 1]`` target against ``[N, 3]`` outputs compares every output with the same target).

    Raises:
        ShapeMismatchError: the shapes differ.
    """
    elementwise = isinstance(loss_fn, _ELEMENTWISE_MODULES) or any(
        loss_fn is f for f in _ELEMENTWISE_FUNCTIONS
    )
    if elementwise and outputs.shape != targets.shape:
        raise ShapeMismatchError(
            f"model output {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in "
            "shape; an element-wise loss needs them equal (torch would broadcast them with only a "
            "warning and compute a different loss): reshape the targets, e.g. "
            "y.reshape(output.shape), or fix the model's output size"
        )


@dataclass(frozen=True)
class LossCurvature:
    """Which loss, identified from ``loss_fn``; ``kind`` in ``{"mse", "ce", "bce"}``.

    ``loss_fn`` is kept for the target weights of cross-entropy (``ignore_index``, class weights).
    """

    kind: str
    loss_fn: Any = None

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise if ``outputs``/``targets`` do not fit this loss's closed-form curvature."""
        check_target_shape(self.loss_fn, outputs, targets)
        if self.kind == "ce" and outputs.ndim < 2:
            raise ShapeMismatchError(
                f"cross-entropy needs outputs of shape [N, C, ...], got {tuple(outputs.shape)}"
            )

    def weights(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """``c``: the weight of each target position (``[N, *spatial]``), ``None`` when all are 1.

        Class-index targets: 0 at ``ignore_index``, else the class weight. Class-probability
        targets: ``Σ_k w_k y_k`` (the total weighted target mass, which scales the output Hessian).
        """
        if self.kind != "ce":
            return None
        c = target_weights(self.loss_fn, targets)
        if c is None and targets.dtype.is_floating_point:
            w = self._class_weight(outputs)
            c = (targets if w is None else targets * w).sum(dim=1)
        return None if c is None else c.to(outputs.dtype)

    def _class_weight(self, outputs: Tensor) -> Tensor | None:
        """The class weights shaped to broadcast against ``[N, C, *spatial]`` outputs."""
        options = class_loss_options(self.loss_fn)
        w = options[1] if options is not None else None
        if w is None:
            return None
        return w.to(outputs).reshape(-1, *([1] * (outputs.ndim - 2)))

    def hessian_sqrt(self, outputs: Tensor, c: Tensor | None) -> Tensor:
        """A factor ``S_n`` with ``S_n S_nᵀ`` = per-sample output Hessian (without ``κ``).

        Outputs ``[N, d]`` give ``[N, d, R]``: MSE ``√2 I`` (R = d), BCE ``diag(√(σ(1-σ)))``
        (R = d), cross-entropy ``√c (diag(√p) - p √pᵀ)`` (R = C), since
        ``(D - p qᵀ)(D - q pᵀ) = diag(p) - ppᵀ`` for ``D = diag(√p)``, ``q = √p``, ``Σ p = 1``.
        """
        if outputs.ndim != 2:
            raise UnsupportedLossError(
                f"exact diagonals need outputs of shape [N, d], got {tuple(outputs.shape)}; "
                "use the stochastic diagonal (curvlab.diagonal) for other shapes"
            )
        n, d = outputs.shape
        eye = torch.eye(d, dtype=outputs.dtype, device=outputs.device)
        if self.kind == "mse":
            return (2.0**0.5) * eye.expand(n, d, d)
        if self.kind == "bce":
            s = torch.sigmoid(outputs)
            return torch.diag_embed((s * (1 - s)).sqrt())
        p = torch.softmax(outputs, dim=1)
        q = p.sqrt()
        S = torch.diag_embed(q) - p[:, :, None] * q[:, None, :]
        return S if c is None else c.sqrt()[:, None, None] * S

    def hessian_matmul(self, outputs: Tensor, U: Tensor, c: Tensor | None) -> Tensor:
        """Per-element output Hessian (without ``κ``) applied to ``U`` of the outputs' shape."""
        if self.kind == "mse":
            return 2.0 * U
        if self.kind == "bce":
            s = torch.sigmoid(outputs)
            return s * (1 - s) * U
        p = torch.softmax(outputs, dim=1)
        HU = p * U - p * (p * U).sum(dim=1, keepdim=True)
        return HU if c is None else c.unsqueeze(1) * HU

    def sample_output_grads(
        self,
        outputs: Tensor,
        mc_samples: int,
        generator: torch.Generator | None,
        c: Tensor | None,
    ) -> Tensor:
        """``[M, *outputs.shape]`` gradients of the summed loss at labels drawn from the model.

        Cross-entropy gradients are scaled by ``√c``, so that their outer products average to the
        weighted output Hessian and ignored targets draw nothing.
        """
        shape = (mc_samples, *outputs.shape)
        if self.kind == "mse":
            # (o - y)^2 is -log N(y; o, 1/2) up to a constant: y = o + N(0, 1/2), grad 2(o - y)
            eps = torch.randn(
                shape, generator=generator, dtype=outputs.dtype, device=outputs.device
            )
            return -2.0 * eps * (0.5**0.5)
        if self.kind == "bce":
            s = torch.sigmoid(outputs).expand(shape)
            y = torch.bernoulli(s, generator=generator)
            return s - y
        p = torch.softmax(outputs, dim=1)
        probs = p.movedim(1, -1).reshape(-1, p.shape[1])
        idx = torch.multinomial(probs, mc_samples, replacement=True, generator=generator)
        onehot = F.one_hot(idx.T, p.shape[1]).to(p.dtype)  # [M, N*rest, C]
        onehot = onehot.reshape(mc_samples, *p.movedim(1, -1).shape).movedim(-1, 2)
        grads = p.unsqueeze(0) - onehot
        return grads if c is None else c.sqrt().unsqueeze(1) * grads

    def output_grad(self, outputs: Tensor, targets: Tensor, c: Tensor | None) -> Tensor:
        """Gradient of the summed, weighted (unnormalised) loss w.r.t. the outputs at the true labels."""
        if self.kind == "mse":
            return 2.0 * (outputs - targets)
        if self.kind == "bce":
            return torch.sigmoid(outputs) - targets
        p = torch.softmax(outputs, dim=1)
        if targets.dtype.is_floating_point:  # class probabilities
            w = self._class_weight(outputs)
            wy = targets if w is None else targets * w
            return p * wy.sum(dim=1, keepdim=True) - wy
        counted = targets.clamp(0, p.shape[1] - 1)  # ignored targets get weight c = 0 below
        onehot = F.one_hot(counted, p.shape[1]).movedim(-1, 1).to(p.dtype)
        grad = p - onehot
        return grad if c is None else c.unsqueeze(1) * grad


def loss_curvature(loss_fn: Any) -> LossCurvature:
    """Identify a supported loss or raise :class:`UnsupportedLossError` naming the supported ones."""
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        return LossCurvature("mse", loss_fn)
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.label_smoothing != 0.0:
                raise UnsupportedLossError(
                    "GGN/Fisher operators support nn.CrossEntropyLoss without label smoothing; "
                    "use HessianOperator for the smoothed loss"
                )
            if loss_fn.weight is not None and bool((loss_fn.weight < 0).any()):
                raise UnsupportedLossError(
                    "GGN/Fisher operators need non-negative class weights (a negative weight "
                    "makes the output Hessian indefinite); use HessianOperator for that loss"
                )
        return LossCurvature("ce", loss_fn)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (
            loss_fn.weight is not None or loss_fn.pos_weight is not None
        ):
            raise UnsupportedLossError(
                "GGN/Fisher operators support nn.BCEWithLogitsLoss without weight/pos_weight; use "
                "HessianOperator for the weighted loss"
            )
        return LossCurvature("bce", loss_fn)
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    raise UnsupportedLossError(
        f"GGN and Fisher operators support {SUPPORTED}; got {name}. For any other loss use "
        "HessianOperator, which works with every differentiable loss."
    )
