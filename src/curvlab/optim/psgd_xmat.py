r"""PSGD with an X-shaped ("XMat") preconditioner ``Q = diag(a) + adiag(b)`` (Xi-Lin Li).

The rule, over the ``N`` entries of a param group concatenated (``flip`` reverses the order, so
entry ``i`` is coupled with entry ``N-1-i``; for odd ``N`` the centre has ``b = 0``)::

    Q h   = a ⊙ h + b ⊙ flip(h)
    Q⁻ᵀ v = (flip(a) ⊙ v - flip(b) ⊙ flip(v)) / (a ⊙ flip(a) - b ⊙ flip(b))
    fit on a pair (v, h):  A = Q h, B = Q⁻ᵀ v
        ∇_a = A² - B²,  ∇_b = A ⊙ flip(A) - B ⊙ flip(B)  (0 at the centre)
        ℓ = max(A² + B²),  L ← max(β L + (1-β) ℓ, ℓ),  μ = preconditioner_lr / L
        a ← a - μ (∇_a ⊙ a + ∇_b ⊙ flip(b)),  b ← b - μ (∇_a ⊙ b + ∇_b ⊙ flip(a))
    P g   = QᵀQ g = (a² + flip(b²)) ⊙ g + (a ⊙ b + flip(a ⊙ b)) ⊙ flip(g)
    step: with probability p_t (or on every pair of fit="hvp"/"finite_difference") fit Q,
        u = P·(m if momentum else g);  u ← u·min(1, 2/RMS(u));  u ← clamp(u, ±10);  θ ← θ - lr·u

The pair is ``(v, h = H v)`` with ``v ~ N(0, I)`` (``fit="hvp"``: a Hessian-vector product;
``fit="finite_difference"``: a gradient difference) or the whitening pair
``(v, g + (damping + ε|g|) v)`` (``fit="whiten"``); the fixed point is ``P = |H|⁻¹``
(resp. ``E[ggᵀ]^{-1/2}``) within the X-shaped family. Initial ``a = init_scale`` or, at the first
step, ``(mean v²)^{1/4}(mean h⁴ + damping⁴)^{-1/8}`` (pairs) or ``(mean g⁴ + damping⁴)^{-1/8}``
(whitening); ``b = 0``.

Written from lixilinx/psgd_torch ``preconditioned_stochastic_gradient_descent.py`` (commit
a8616f1): ``update_precond_Xmat_math_`` with ``step_normalizer="2nd"``,
``precond_grad_Xmat_math`` and the ``XMat`` class. Nothing was copied. Deliberate deviations, to
share one PSGD skeleton with :class:`~curvlab.optim.psgd_kron.PSGDKron` and
:class:`~curvlab.optim.psgd_lra.PSGDLRA` (which follow the newer ``psgd.py``): the step
normaliser is the Lipschitz EMA of ``psgd.py`` over the author's ``max(A² + B²)``
(``beta_lipschitz=0`` is the author's rule, without its ``tiny`` in the denominator); the pair's
``h`` is damped and the whitening pair is ``psgd.py``'s; the update is clipped by RMS and entry
instead of by norm; momentum uses ``β_t = min(t/(t+1), β)``; the finite difference divides by
``δ`` and restores the parameters exactly; randomness comes from seeded generators.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Generator, Tensor

from curvlab.optim import _psgd
from curvlab.optim._psgd import ConcatenatedPSGD, PSGDOptions, PSGDStepOptions, Scale

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["PSGDXMat", "precond_grad_xmat", "psgd_xmat", "update_precond_xmat"]

# state keys: "step", the factor rows, the group's Lipschitz estimate, "momentum_buffer"
_FACTOR_KEYS = ("a", "b")
_LIPSCHITZ_KEYS = ("L",)


class PSGDXMat(ConcatenatedPSGD):
    r"""PSGD with an X-shaped preconditioner ``Q = diag(a) + adiag(b)`` over each param group.

    One preconditioner per param group over all its parameters concatenated (``N`` entries):
    a diagonal plus an anti-diagonal, so each entry is coupled with its mirror image — slightly
    more than a diagonal preconditioner at the same ``O(N)`` cost. The rule is the algorithm box
    of :mod:`curvlab.optim.psgd_xmat`. State, per parameter: its entries of ``a`` and ``b``
    (flat), ``step``, the group's Lipschitz estimate ``L`` (the same in every parameter) and
    ``momentum_buffer``: ``2`` extra values per entry (plus one with momentum). A parameter
    without a gradient at a step is left out of that step's preconditioner (the mirror pairs are
    then taken over the others).

    Args:
        params: parameters or param groups.
        lr: step size (official ``lr_params``), default 1e-3.
        **options: keyword-only ``fit`` (``"whiten"`` default, ``"hvp"``,
            ``"finite_difference"``; a pair fit needs a closure that returns the loss without
            ``backward()``), ``preconditioner_lr, beta_lipschitz, damping, momentum,
            weight_decay, decoupled_weight_decay, grad_clip_max_amps,
            preconditioner_update_probability, prob_max, prob_min, prob_decay, prob_flat_start,
            init_scale, update_preconditioner_first, whiten_grad, seed, on_nonfinite``, as in
            :class:`~curvlab.optim.psgd_kron.PSGDKron`.

    Raises:
        ParameterError: a hyper-parameter out of range, an unknown option, or a sparse gradient.
        NonFiniteError: a NaN/inf gradient with ``on_nonfinite="raise"``.
        ClosureRequiredError: a pair fit stepped without a closure, or with one that calls
            ``backward()``.
        StateDictError: ``load_state_dict`` with a state that does not fit.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = PSGDXMat([w], lr=0.5, fit="hvp", preconditioner_update_probability=1.0)
        >>> for _ in range(30):
        ...     _ = opt.step(lambda: (w * w).sum())
        >>> bool(w.abs().max() < 1e-3), tuple(opt.state[w]["b"].shape)
        (True, (3,))

    Papers: X.-L. Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018
    (arXiv:1512.04202); X.-L. Li, "Preconditioner on Matrix Lie Group for SGD", ICLR 2019
    (arXiv:1809.10232). Code: lixilinx/psgd_torch
    ``preconditioned_stochastic_gradient_descent.py`` @a8616f1.
    """

    _FACTOR_KEYS = _FACTOR_KEYS
    _LIPSCHITZ_KEYS = _LIPSCHITZ_KEYS

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        **options: Unpack[PSGDOptions],
    ) -> None:
        super().__init__(params, {"lr": lr}, options)

    def _validate_extra(self, group: dict[str, Any]) -> None:
        """No hyper-parameters beyond the shared PSGD options."""

    def _new_factors(
        self, group: dict[str, Any], total: int, scale: Scale, ref: Tensor, gen: Generator | None
    ) -> dict[str, Tensor]:
        """``a = scale``, ``b = 0`` (official)."""
        a = torch.ones(total, dtype=ref.dtype, device=ref.device).mul_(scale)
        return {"a": a, "b": torch.zeros_like(a)}

    def _factor_shapes(self, saved_group: Mapping[str, Any], n: int) -> dict[str, tuple[int, ...]]:
        return {"a": (n,), "b": (n,)}

    def _functional(self) -> Callable[..., None]:
        return psgd_xmat


def psgd_xmat(
    *lists: list[Any],
    precond: tuple[Tensor, Tensor],
    pair: tuple[Tensor, Tensor] | None = None,
    **options: Unpack[PSGDStepOptions],
) -> None:
    """Functional API that performs the PSGD-XMat computation; see :class:`PSGDXMat`.

    ``lists``: ``params, grads, momentum_buffers, lipschitz, state_steps``, equally long.

    ``precond = (a, b)``: the group's diagonal and anti-diagonal over the parameters concatenated
    (``[N]`` each, updated in place); ``lipschitz[j]`` holds ``(L,)`` of parameter ``j`` (the
    group's value, written back into every entry); ``pair``: for ``fit="hvp"`` or
    ``"finite_difference"``, the group's ``(v, Hv)`` as ``[N, 1]`` columns on a refit step,
    ``None`` otherwise. Updates ``params``, ``momentum_buffers`` and ``state_steps`` in place.
    There is no multi-tensor path (the rule is a handful of ``O(N)`` vector operations on the
    concatenation): it calls :func:`_single_tensor_psgd_xmat`.
    """
    _single_tensor_psgd_xmat(*lists, precond=precond, pair=pair, **options)


def _single_tensor_psgd_xmat(
    *lists: list[Any],
    precond: tuple[Tensor, Tensor],
    pair: tuple[Tensor, Tensor] | None,
    **options: Unpack[PSGDStepOptions],
) -> None:
    """The PSGD-XMat step of the module's algorithm box (the reference), on the group's
    concatenated vectors (:func:`~curvlab.optim._psgd.concatenated_rule`)."""
    a, b = (x.view(-1, 1) for x in precond)
    kw = {"lr": options["preconditioner_lr"], "beta_lipschitz": options["beta_lipschitz"]}

    def fit(L: list[Tensor], v: Tensor, h: Tensor, gen: Generator | None) -> None:
        update_precond_xmat(a, b, L, v, h, **kw)

    apply = functools.partial(precond_grad_xmat, a, b)
    _psgd.concatenated_rule(lists, pair, options, fit=fit, apply=apply)


def _flip(x: Tensor) -> Tensor:
    return torch.flip(x, [0])


def precond_grad_xmat(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    """``P g`` with ``P = QᵀQ``, ``Q = diag(a) + adiag(b)``:
    ``(a² + flip(b²)) ⊙ g + (a ⊙ b + flip(a ⊙ b)) ⊙ flip(g)`` (official
    ``precond_grad_Xmat_math``). ``a, b, g`` have the same shape (flipped along dim 0).

    Example:
        >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
        >>> precond_grad_xmat(a, b, torch.tensor([1.0, 0.0]))  # Q = [[1, .5], [0, 2]]
        tensor([1.0000, 0.5000])
    """
    ab = a * b
    return (a * a + _flip(b * b)) * g + (ab + _flip(ab)) * _flip(g)


def update_precond_xmat(
    a: Tensor,
    b: Tensor,
    L: Sequence[Tensor],
    v: Tensor,
    h: Tensor,
    *,
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
) -> None:
    """Fit ``Q = diag(a) + adiag(b)`` on the pair ``(v, h)``, in place (official
    ``update_precond_Xmat_math_``, ``step_normalizer="2nd"``, with the Lipschitz EMA of
    ``psgd.py``; ``beta_lipschitz=0`` is the official normaliser).

    Criterion ``E[hᵀPh + vᵀP⁻¹v]``; the steps are in the module's algorithm box.

    Args:
        a, b: the diagonal and anti-diagonal (same shape as ``v``, ``h``; flipped along dim 0).
        L: one 0-d Lipschitz estimate (updated in place).
        v, h: the probe and ``H v`` (or the whitening pair).
        lr: preconditioner step size; beta_lipschitz: EMA factor of the Lipschitz estimate.
    """
    qh = a * h + b * _flip(h)
    af, bf = _flip(a), _flip(b)
    iqv = (af * v - bf * _flip(v)) / (a * af - b * bf)
    qh2, iqv2 = qh * qh, iqv * iqv
    grad_a = qh2 - iqv2
    grad_b = qh * _flip(qh) - iqv * _flip(iqv)
    n = grad_b.shape[0]
    if n % 2 == 1:
        grad_b[n // 2] = 0
    lip = _psgd.update_lipschitz(L[0], torch.max(qh2 + iqv2), beta_lipschitz)
    mu = (lr / lip).to(a.dtype)
    da = grad_a * a + grad_b * bf
    db = grad_a * b + grad_b * af
    a.sub_(mu * da)
    b.sub_(mu * db)
