"""Output-space curvature of the losses GGN and Fisher operators support.

For a loss :math:`L = \\kappa \\sum_e \\ell_e(o_e, y_e)` (``κ`` the reduction's normalisation times
the batch weight), we need the output Hessian ``∇²_o L`` applied to a vector, a sample of the
output gradient under labels drawn from the model (Fisher), and the output gradient under the
true labels (empirical Fisher). Supported: MSE, cross-entropy, BCE-with-logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.errors import ShapeMismatchError, UnsupportedLossError

__all__ = ["LossCurvature", "loss_curvature"]

SUPPORTED = "nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss (or their functional forms)"


@dataclass(frozen=True)
class LossCurvature:
    """Which loss, identified from ``loss_fn``; ``kind`` in ``{"mse", "ce", "bce"}``."""

    kind: str

    def scale(self, outputs: Tensor, reduction: str) -> float:
        """``c``: the reduction's factor per element of the summed loss."""
        if reduction == "sum":
            return 1.0
        if self.kind == "ce":
            return 1.0 / (outputs.numel() // outputs.shape[1] if outputs.ndim > 1 else 1)
        return 1.0 / outputs.numel()

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise if ``outputs``/``targets`` do not fit this loss's closed-form curvature."""
        if self.kind in ("mse", "bce") and outputs.shape != targets.shape:
            raise ShapeMismatchError(
                f"model output {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in "
                f"shape; {self.kind.upper()} needs them equal (no broadcasting)"
            )
        if self.kind == "ce" and outputs.ndim < 2:
            raise ShapeMismatchError(
                f"cross-entropy needs outputs of shape [N, C, ...], got {tuple(outputs.shape)}"
            )
        if self.kind == "ce" and not targets.dtype.is_floating_point:
            if bool((targets < 0).any()) or bool((targets >= outputs.shape[1]).any()):
                raise UnsupportedLossError(
                    "class targets outside [0, C) (e.g. ignore_index) are not supported by GGN/"
                    "Fisher operators; drop those examples from the data"
                )

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        """A factor ``S_n`` with ``S_n S_nᵀ`` = per-sample output Hessian (without ``κ``).

        Outputs ``[N, d]`` give ``[N, d, R]``: MSE ``√2 I`` (R = d), BCE ``diag(√(σ(1-σ)))``
        (R = d), cross-entropy ``diag(√p) - p √pᵀ`` (R = C), since
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
        return torch.diag_embed(q) - p[:, :, None] * q[:, None, :]

    def hessian_matmul(self, outputs: Tensor, U: Tensor) -> Tensor:
        """Per-element output Hessian (without ``κ``) applied to ``U`` of the outputs' shape."""
        if self.kind == "mse":
            return 2.0 * U
        if self.kind == "bce":
            s = torch.sigmoid(outputs)
            return s * (1 - s) * U
        p = torch.softmax(outputs, dim=1)
        return p * U - p * (p * U).sum(dim=1, keepdim=True)

    def sample_output_grads(
        self, outputs: Tensor, mc_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """``[M, *outputs.shape]`` gradients of the summed loss at labels drawn from the model."""
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
        return p.unsqueeze(0) - onehot

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Gradient of the summed (unnormalised) loss w.r.t. the outputs at the true labels."""
        if self.kind == "mse":
            return 2.0 * (outputs - targets)
        if self.kind == "bce":
            return torch.sigmoid(outputs) - targets
        p = torch.softmax(outputs, dim=1)
        if targets.dtype.is_floating_point:  # class probabilities
            return p * targets.sum(dim=1, keepdim=True) - targets
        onehot = F.one_hot(targets, p.shape[1]).movedim(-1, 1).to(p.dtype)
        return p - onehot


def loss_curvature(loss_fn: Any) -> LossCurvature:
    """Identify a supported loss or raise :class:`UnsupportedLossError` naming the supported ones."""
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        return LossCurvature("mse")
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
                raise UnsupportedLossError(
                    "GGN/Fisher operators support nn.CrossEntropyLoss without class weights and "
                    "label smoothing; use HessianOperator for the weighted/smoothed loss"
                )
        return LossCurvature("ce")
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (
            loss_fn.weight is not None or loss_fn.pos_weight is not None
        ):
            raise UnsupportedLossError(
                "GGN/Fisher operators support nn.BCEWithLogitsLoss without weight/pos_weight; use "
                "HessianOperator for the weighted loss"
            )
        return LossCurvature("bce")
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    raise UnsupportedLossError(
        f"GGN and Fisher operators support {SUPPORTED}; got {name}. For any other loss use "
        "HessianOperator, which works with every differentiable loss."
    )
