"""Does gradient descent happen in a tiny subspace? Gradient overlap with the top Hessian eigenspace.

With V_k the top-k Hessian eigenvectors (k = number of classes by default) and g the gradient on
the probe batch (Gur-Ari, Roberts & Dyer 2018, eq. 5):

    gradient overlap     f_top = ‖V_kᵀ g‖² / ‖g‖²            (a random k-dim subspace gives k/n)
    subspace persistence ov(t₁, t₂) = ‖V_{t₁}ᵀ V_{t₂}‖_F² / k   (1: the same subspace)

and the ablations of Song, Ahn & Yun (2024): Dom-SGD steps with the projection P_k g only,
Bulk-SGD with (I − P_k) g (:func:`project_gradient_`). They found the overlap high yet Dom-SGD
unable to decrease the loss, while Bulk-SGD trains like SGD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.errors import InvalidArgumentError, ShapeMismatchError
from curvlab.monitors._curvature import EigenMonitor

__all__ = ["SubspaceOverlap", "gradient_overlap", "project_gradient_", "subspace_persistence"]


def gradient_overlap(grad: Tensor, basis: Tensor) -> float:
    """‖Vᵀg‖²/‖g‖² for an orthonormal basis V ([n, k]) and a gradient g ([n]).

    Example:
        >>> import torch
        >>> gradient_overlap(torch.tensor([3.0, 4.0, 0.0]), torch.eye(3)[:, :1])
        0.36
    """
    norm2 = float(grad @ grad)
    if norm2 == 0.0:
        return math.nan
    proj = basis.T.to(grad.dtype) @ grad
    return float(proj @ proj) / norm2


def subspace_persistence(basis_a: Tensor, basis_b: Tensor) -> float:
    """‖V_aᵀ V_b‖_F² / k: 1 for the same k-dim subspace, k/n on average for random ones.

    Example:
        >>> import torch
        >>> subspace_persistence(torch.eye(4)[:, :2], torch.eye(4)[:, 1:3])
        0.5
    """
    if basis_a.shape != basis_b.shape:
        raise ShapeMismatchError(
            f"both bases must have the same shape [n, k], got {tuple(basis_a.shape)} and "
            f"{tuple(basis_b.shape)}"
        )
    return float((basis_a.T @ basis_b).pow(2).sum()) / basis_a.shape[1]


@torch.no_grad()
def project_gradient_(params: Sequence[Tensor], basis: Tensor, keep: str = "dom") -> None:
    """Replace each ``p.grad`` by its projection onto span(basis) (``"dom"``) or its complement (``"bulk"``).

    ``basis`` is an orthonormal [n, k] matrix over the flat concatenation of ``params`` (the order
    of :class:`~curvlab.operators.ParamSpace`). Call it between ``backward()`` and ``step()`` to run
    Dom-SGD / Bulk-SGD (Song, Ahn & Yun 2024, arXiv 2405.16002).

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([1.0, 2.0, 3.0])
        >>> project_gradient_([p], torch.eye(3)[:, :1], keep="bulk"); p.grad.tolist()
        [0.0, 2.0, 3.0]
    """
    if keep not in ("dom", "bulk"):
        raise InvalidArgumentError(
            f"keep must be 'dom' (Dom-SGD) or 'bulk' (Bulk-SGD), got {keep!r}"
        )
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    if basis.shape[0] != flat.shape[0]:
        raise ShapeMismatchError(
            f"the basis has {basis.shape[0]} rows but the parameters have {flat.shape[0]} entries"
        )
    b = basis.to(flat.dtype)
    dom = b @ (b.T @ flat)
    new = dom if keep == "dom" else flat - dom
    offset = 0
    for p in params:
        n = p.numel()
        chunk = new[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


class SubspaceOverlap(EigenMonitor):
    """Monitor the gradient's overlap with the top-k Hessian eigenspace and that space's persistence.

    Each check computes the top-k eigenpairs of the probe-batch Hessian (Lanczos, warm-started from
    the previous top eigenvector) and the probe-batch gradient.

    Args:
        model, loss_fn, data: as for :class:`~curvlab.monitors.Sharpness`.
        k: subspace dimension (default: the number of model outputs, i.e. classes).
        params: the parameters (default: all trainable).
        tol: Lanczos tolerance (default 1e-2: eigenvectors, not digits, matter here).
        max_matvecs: HVP budget per check.
        generator: randomness of the first start vector.
        every, name: as for every monitor (default name ``"subspace"``).

    Numbers: ``grad_overlap``, ``random_overlap`` (k/n), ``persistence`` (vs the previous check;
    NaN at the first), ``top_eigenvalue``, ``kth_eigenvalue``, ``matvecs``.

    Attributes:
        basis: the last top-k eigenvectors [n, k] (for :func:`project_gradient_`).

    Paper: Gur-Ari, Roberts & Dyer, "Gradient Descent Happens in a Tiny Subspace", 2018
    (arXiv 1812.04754); Song, Ahn & Yun, "Does SGD really happen in tiny subspaces?", ICLR 2025
    (arXiv 2405.16002).
    """

    default_name = "subspace"
    basis: Tensor | None = None
    eigenvalues: Tensor | None = None

    def validate(self, optimizer: torch.optim.Optimizer) -> None:
        """Default checks; k defaults to the model's output width and must be < n."""
        super().validate(optimizer)
        assert self.model is not None and self.data is not None
        if self.k is None:
            with torch.no_grad():
                out = self.model(self.data[0][:1])
            self.k = int(out.shape[-1]) if out.ndim > 1 else 1
        n = self.operator.shape[0]
        if self.k >= n:
            raise InvalidArgumentError(
                f"monitor {self.name!r}: k = {self.k} must be smaller than n = {n} parameters; "
                "pass a smaller k"
            )

    def compute(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Overlap of the probe gradient with the top-k eigenspace; persistence vs the last check."""
        assert self.counter is not None and self.k is not None
        v0 = self.basis[:, 0] if self.basis is not None else None
        res, used = self.top_eigenpairs(self.counter, v0)
        basis = res.vectors.detach()
        _, grad = self.operator.loss_and_gradient()
        previous = self.basis
        self.basis, self.eigenvalues = basis, res.values
        n = basis.shape[0]
        return {
            "grad_overlap": gradient_overlap(grad, basis),
            "random_overlap": self.k / n,
            "persistence": subspace_persistence(previous, basis)
            if previous is not None
            else math.nan,
            "top_eigenvalue": float(res.values[0]),
            "kth_eigenvalue": float(res.values[-1]),
            "matvecs": float(used),
        }
