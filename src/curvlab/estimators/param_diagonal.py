"""Per-parameter curvature diagonals, the estimates the curvature optimizers (Sophia, AdaHessian) use.

Unlike :func:`curvlab.estimators.diagonal`, which works on a curvature operator, these act on a
list of parameters and the autograd graph of one loss, one probe per call, so that an optimizer
can refresh its curvature from the forward pass of its own step. Three diagonal estimators:

* **Hutchinson** (Bekas, Kokiopoulou, Saad 2007; used by AdaHessian and SophiaH): for a Rademacher
  probe z (entries ±1), ``ĥ = z ⊙ (H z)``. Since ``z_i² = 1``,
  ``ĥ_i = H_ii + Σ_{j≠i} H_ij z_i z_j``: the diagonal part is exact for every draw, the off-diagonal
  part vanishes only in expectation (variance ``Σ_{j≠i} H_ij²`` per coordinate). On a diagonal
  Hessian the estimate is therefore exact.
* **Gauss-Newton-Bartlett** (GNB; Liu et al. 2023, the estimator of SophiaG): sample labels from
  the model's own predictive distribution, ``ŷ_b ~ Categorical(logits=outputs_b)``, take the
  gradient ``ĝ`` of the *mean* cross-entropy ``L̂ = (1/B) Σ_b CE(outputs_b, ŷ_b)`` and return
  ``B · ĝ ⊙ ĝ``, where ``B`` is the number of predictions (rows of ``outputs``; tokens for a
  language model). By Bartlett's second identity
  ``E[B ĝ ĝᵀ] = (1/B) Σ_b J_bᵀ (diag p_b − p_b p_bᵀ) J_b``, the Gauss-Newton matrix of the mean
  loss, so ``E[B ĝ ⊙ ĝ]`` is its diagonal (always ≥ 0).
  With ``likelihood="gaussian"`` the targets are ``ŷ = outputs + ε``, ``ε ~ N(0, I)``, and the loss
  is ``(1/B) Σ_b ½‖outputs_b − ŷ_b‖²`` (Gauss-Newton of the mean half squared error).
* **Spatial averaging** (Yao et al. 2021, AdaHessian): for a convolution kernel
  ``[out, in, *spatial]`` the magnitude ``|ĥ|`` is averaged over the spatial dimensions (kept as
  size-1 dims, so it broadcasts back), which lowers the variance of the estimate.

:class:`HutchinsonEstimator` and :class:`GNBEstimator` are the :class:`CurvatureEstimator`
callables that :class:`curvlab.optim.Sophia` and :class:`curvlab.optim.AdaHessian` take as their
``estimator=`` argument (the strings ``"hutchinson"`` and ``"gnb"`` build them): given the
parameters, the loss gradient (with its graph) and the outputs of the optimizer's closure, each
returns the diagonal estimate. The optimizer builds the ``create_graph=True`` graph only on the
steps that refresh the curvature, and only for estimators that declare ``create_graph = True``.

Papers: Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training", 2023, arXiv:2305.14342. Yao, Gholami, Shen, Mustafa, Keutzer,
Mahoney, "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning", 2021,
arXiv:2006.00719.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from curvlab.errors import ClosureRequiredError, ParameterError, ShapeMismatchError
from curvlab.estimators.probes import rademacher_like

__all__ = [
    "CurvatureEstimator",
    "GNBEstimator",
    "HutchinsonEstimator",
    "gnb_diagonal",
    "hutchinson_diagonal",
    "spatial_average",
]


class CurvatureEstimator(Protocol):
    """What a curvature optimizer calls on the steps that refresh its curvature.

    ``estimator(params, grads, outputs, generator) -> diagonal``: ``params`` are the parameters
    that take part (all require grad); ``grads`` the gradient of the closure's loss, taken by the
    optimizer with ``create_graph=True`` if ``estimator.create_graph`` is true (second derivatives
    needed, e.g. Hutchinson) and otherwise with the graph merely retained (e.g. GNB, which
    back-propagates another loss through the same forward pass); ``outputs`` the model outputs
    the loss was computed from (``None`` if the closure returned only the loss); ``generator``
    the optimizer's random source. It returns one detached diagonal estimate per parameter
    (``None`` where the gradient is ``None``). With ``retain_graph=True`` it keeps the graph it
    differentiates (a framework loop back-propagates the same forward pass afterwards).

    A plain function works too: without a ``create_graph`` attribute it is called with
    ``create_graph=False`` gradients; set ``my_estimator.create_graph = True`` if it takes
    Hessian-vector products.
    """

    create_graph: ClassVar[bool]

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        outputs: Tensor | None,
        generator: torch.Generator | None,
        *,
        retain_graph: bool = False,
    ) -> list[Tensor | None]: ...


def hutchinson_diagonal(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    *,
    generator: torch.Generator | None = None,
    probes: Sequence[Tensor] | None = None,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """Hutchinson estimate ``z ⊙ (H z)`` of the Hessian diagonal, one probe, one backward call.

    ``grads`` must be the gradient of the loss with respect to ``params`` built with
    ``create_graph=True``. One ``torch.autograd.grad`` call over all parameters gives the Hessian-
    vector product ``H z`` (gradient entries that carry no graph, e.g. of a parameter the loss is
    linear in, contribute zero rows); the graph is released afterwards unless ``retain_graph``. Probes are Rademacher,
    drawn with :func:`curvlab.estimators.probes.rademacher_like` from ``generator`` in the order of
    ``params`` (skipping parameters whose gradient is ``None``), unless given as ``probes``.

    For every draw ``ĥ_i = H_ii + Σ_{j≠i} H_ij z_i z_j``: exact on a diagonal Hessian, unbiased with
    variance ``Σ_{j≠i} H_ij²`` per coordinate in general.

    Args:
        params: parameters, each with ``requires_grad=True``.
        grads: their gradients with graph (``None`` for parameters the loss does not use).
        generator: random source of the probes.
        probes: optional explicit probes, one per non-``None`` gradient (shapes as the params).
        retain_graph: keep the graph for a later backward through the same forward pass.

    Returns:
        One tensor per parameter (``None`` where the gradient was ``None``), detached.

    Raises:
        ShapeMismatchError: if ``grads`` (or ``probes``) do not fit ``params``.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> loss = 0.5 * (torch.tensor([3.0, 5.0]) * x * x).sum()
        >>> (g,) = torch.autograd.grad(loss, [x], create_graph=True)
        >>> hutchinson_diagonal([x], [g], generator=torch.Generator().manual_seed(0))
        [tensor([3., 5.])]

    Paper: Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix", 2007; used by
    Yao et al. 2021 (arXiv:2006.00719) and Liu et al. 2023 (arXiv:2305.14342).
    """
    if len(grads) != len(params):
        raise ShapeMismatchError(
            f"hutchinson_diagonal got {len(grads)} gradients for {len(params)} parameters; pass "
            "one gradient (or None) per parameter, in the same order"
        )
    used = [i for i, g in enumerate(grads) if g is not None]
    used_params = [params[i] for i in used]
    if probes is None:
        zs = rademacher_like(used_params, generator=generator)
    else:
        zs = list(probes)
        if len(zs) != len(used) or any(
            z.shape != p.shape for z, p in zip(zs, used_params, strict=True)
        ):
            raise ShapeMismatchError(
                "hutchinson_diagonal: pass one probe per parameter with a gradient, shaped like it"
            )
    used_grads = [g for g in grads if g is not None]
    with_graph = [k for k, g in enumerate(used_grads) if g.requires_grad]
    hz: list[Tensor | None] = [None] * len(used)
    if with_graph:
        products = torch.autograd.grad(
            [used_grads[k] for k in with_graph],
            used_params,
            grad_outputs=[zs[k] for k in with_graph],
            allow_unused=True,
            retain_graph=retain_graph,
        )
        hz = list(products)
    out: list[Tensor | None] = [None] * len(params)
    for k, i in enumerate(used):
        h = hz[k]
        # h is a fresh tensor from autograd.grad (no graph): overwrite it instead of allocating
        out[i] = torch.zeros_like(params[i]) if h is None else h.mul_(zs[k])
    return out


def _generator_on(
    device: torch.device, generator: torch.Generator | None
) -> torch.Generator | None:
    """``generator`` if it lives on ``device`` (or is ``None``); else a generator on ``device``
    seeded by one draw of ``generator`` (a host-side draw for a CPU generator: no device sync).
    On the ``meta`` device (shapes without values) there is no stream to follow: ``None``."""
    if device.type == "meta":
        return None
    if generator is None or generator.device == device:
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def gnb_diagonal(
    params: Sequence[Tensor],
    outputs: Tensor,
    *,
    generator: torch.Generator | None = None,
    likelihood: str = "categorical",
    batch_size: int | None = None,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """Gauss-Newton-Bartlett estimate ``B · ĝ ⊙ ĝ`` of the Gauss-Newton diagonal (SophiaG).

    Labels are sampled from the model's own outputs: ``ŷ_b ~ Categorical(logits=outputs_b)``
    (``likelihood="categorical"``, outputs ``[..., C]``, all leading dims are predictions), or
    ``ŷ_b = outputs_b + ε_b``, ``ε ~ N(0, I)`` (``likelihood="gaussian"``). ``ĝ`` is the gradient of
    the mean loss over the ``B`` predictions (cross-entropy, or ``½‖outputs_b − ŷ_b‖²``) and the
    estimate is ``B · ĝ ⊙ ĝ``, whose expectation is the diagonal of the Gauss-Newton matrix of
    the *mean* loss. This is the authors' batch-size convention: the official SophiaG stores the
    EMA of ``ĝ ⊙ ĝ`` and multiplies it by ``bs`` (tokens per batch) inside the step; here the
    factor is applied in the estimate, so the stored value is a Hessian-diagonal estimate.

    Args:
        params: parameters (require grad) that ``outputs`` depends on.
        outputs: model outputs with their graph (logits for ``"categorical"``).
        generator: random source of the sampled labels. One on another device than ``outputs``
            (a CPU generator for CUDA logits) is not used directly: one number drawn from it seeds
            a generator on the outputs' device, so the labels are sampled where the logits are
            (no copy of the logits to the host, no synchronisation) and still follow
            ``generator``'s state.
        likelihood: ``"categorical"`` or ``"gaussian"``.
        batch_size: ``B``; default the number of predictions in ``outputs``. Override it when the
            loss is a mean over a different count (e.g. padding excluded).
        retain_graph: keep the graph of ``outputs`` for a later backward (default: released).

    Returns:
        One detached tensor per parameter (``None`` for parameters ``outputs`` does not use).

    Raises:
        ParameterError: for an unknown ``likelihood``.
        ShapeMismatchError: if categorical ``outputs`` have no class dimension.

    Example:
        >>> w = torch.zeros(3, 2, requires_grad=True)
        >>> logits = torch.eye(3)[:, :3] @ w
        >>> d = gnb_diagonal([w], logits, generator=torch.Generator().manual_seed(0))
        >>> d[0].shape, bool((d[0] >= 0).all())
        (torch.Size([3, 2]), True)

    Paper: Liu, Li, Hall, Liang, Ma 2023, arXiv:2305.14342 (Algorithm 2).
    """
    generator = _generator_on(outputs.device, generator)  # the draws happen where outputs are
    if likelihood == "categorical":
        if outputs.ndim < 1 or outputs.shape[-1] < 1:
            raise ShapeMismatchError(
                "gnb_diagonal with likelihood='categorical' needs logits shaped [..., C]; got "
                f"outputs of shape {tuple(outputs.shape)}"
            )
        flat = outputs.reshape(-1, outputs.shape[-1])
        n = flat.shape[0]
        with torch.no_grad():
            probs = torch.softmax(flat.detach().to(torch.float32), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        sampled = F.cross_entropy(flat, labels, reduction="mean")
    elif likelihood == "gaussian":
        n = outputs.numel() // outputs.shape[-1] if outputs.ndim >= 2 else outputs.numel()
        with torch.no_grad():
            noise = torch.randn(
                outputs.shape, generator=generator, device=outputs.device, dtype=outputs.dtype
            )
        sampled = 0.5 * (noise - outputs + outputs.detach()).square().sum() / max(n, 1)
    else:
        raise ParameterError(
            f"unknown likelihood {likelihood!r}; use 'categorical' (logits) or 'gaussian' "
            "(regression outputs)"
        )
    scale = float(n if batch_size is None else batch_size)
    g_hat = torch.autograd.grad(sampled, list(params), allow_unused=True, retain_graph=retain_graph)
    return [None if g is None else (g * g).mul_(scale) for g in g_hat]


def spatial_average(d: Tensor) -> Tensor:
    """AdaHessian's spatial averaging: ``|d|`` averaged over a kernel's spatial dims.

    For a tensor with 3 or more dims (a convolution kernel ``[out, in, *spatial]``) returns
    ``mean(|d|, dims=2..)`` with the averaged dims kept as size 1, so it broadcasts back to the
    kernel's shape; for 0-, 1- and 2-D tensors returns ``|d|``. The official code averages 4-D
    (Conv2d) kernels over dims (2, 3) and 0-2-D tensors not at all; 3-D and 5-D kernels
    (Conv1d, Conv3d) are averaged the same way here (the official code has no branch for them).

    Example:
        >>> spatial_average(torch.tensor([[[1.0, -3.0]]])).tolist()
        [[[2.0]]]

    Paper: Yao et al. 2021, arXiv:2006.00719, Section 3.3 ("spatial averaging").
    """
    if d.ndim >= 3:
        return d.abs().mean(dim=tuple(range(2, d.ndim)), keepdim=True)
    return d.abs()


@dataclass(frozen=True)
class HutchinsonEstimator:
    """The :class:`CurvatureEstimator` of SophiaH and AdaHessian: ``z ⊙ (H z)``, one probe.

    Needs gradients built with ``create_graph=True`` (``create_graph`` is ``True``); ``outputs``
    is not used. Cost: one double-backward (about two backward passes). See
    :func:`hutchinson_diagonal`.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = torch.autograd.grad(0.5 * (x * x).sum(), [x], create_graph=True)
        >>> HutchinsonEstimator()([x], [g], None, None)[0].tolist()
        [1.0, 1.0]

    Paper: Yao et al. 2021, arXiv:2006.00719; Liu et al. 2023, arXiv:2305.14342 (SophiaH).
    """

    create_graph: ClassVar[bool] = True

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        outputs: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        retain_graph: bool = False,
    ) -> list[Tensor | None]:
        """``z ⊙ (H z)`` per parameter from the gradients with graph (see the class)."""
        return hutchinson_diagonal(params, grads, generator=generator, retain_graph=retain_graph)


@dataclass(frozen=True)
class GNBEstimator:
    """The :class:`CurvatureEstimator` of SophiaG: ``B · ĝ ⊙ ĝ`` on labels sampled from ``outputs``.

    The optimizer has taken the loss gradient with the graph retained (``create_graph`` is
    ``False``), so the sampled loss back-propagates through the same forward pass: one forward and
    two backward passes per refresh (the official SophiaG loop spends a second forward). ``grads``
    is not used. See :func:`gnb_diagonal`.

    Args:
        likelihood: ``"categorical"`` (default; logits ``[..., C]``) or ``"gaussian"``.
        batch_size: ``B``; default the number of predictions in ``outputs``.

    Raises:
        ParameterError: an unknown ``likelihood`` or a ``batch_size`` that is not a positive int
            (at construction).
        ClosureRequiredError: (when called) ``outputs`` is ``None`` or carries no graph — the
            closure must return ``(loss, logits)`` for the GNB estimator.

    Example:
        >>> w = torch.zeros(2, 3, requires_grad=True)
        >>> d = GNBEstimator()([w], [None], torch.eye(2) @ w, torch.Generator().manual_seed(0))
        >>> d[0].shape
        torch.Size([2, 3])

    Paper: Liu et al. 2023, arXiv:2305.14342 (Algorithm 2).
    """

    likelihood: str = "categorical"
    batch_size: int | None = None
    create_graph: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.likelihood not in ("categorical", "gaussian"):
            raise ParameterError(
                f"likelihood must be 'categorical' or 'gaussian', got {self.likelihood!r}"
            )
        bs = self.batch_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise ParameterError(
                "bs must be a positive int (predictions per batch, e.g. tokens) or None, "
                f"got {bs!r}"
            )

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        outputs: Tensor | None,
        generator: torch.Generator | None = None,
        *,
        retain_graph: bool = False,
    ) -> list[Tensor | None]:
        """``B · ĝ ⊙ ĝ`` per parameter from the closure's outputs (see the class)."""
        if outputs is None:
            raise ClosureRequiredError(
                "the Gauss-Newton-Bartlett estimator samples labels from the model's outputs: the "
                "closure must return (loss, logits), e.g.\n"
                "    def closure():\n"
                "        logits = model(x)\n"
                "        return loss_fn(logits, y), logits\n"
                "(or use estimator='hutchinson', which needs only the loss)"
            )
        if not isinstance(outputs, Tensor) or outputs.grad_fn is None:
            raise ClosureRequiredError(
                "the closure's outputs must be the model outputs (logits) the loss was computed "
                "from, with their autograd graph (not detached)"
            )
        return gnb_diagonal(
            params,
            outputs,
            generator=generator,
            likelihood=self.likelihood,
            batch_size=self.batch_size,
            retain_graph=retain_graph,
        )
