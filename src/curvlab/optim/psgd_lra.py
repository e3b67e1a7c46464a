"""PSGD with a low-rank-approximation (LRA) whitening preconditioner (Xi-Lin Li).

Faithful to the official code, lixilinx/psgd_torch ``psgd.py`` at commit a8616f1 (2026-04-02):
``update_precond_lra``, ``precond_grad_lra``, ``update_precond_lra_whiten`` and ``LRAWhiten.step``
(one preconditioner over all parameters of a param group, concatenated), with the decoupled weight
decay and update-probability handling of :class:`~curvlab.optim.psgd_kron.PSGDKron`. The rules were
re-written from reading; nothing was copied.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Generator, Tensor

from curvlab.errors import ParameterError
from curvlab.optim import _psgd
from curvlab.optim._psgd import ConcatenatedPSGD, PSGDOptions, PSGDStepOptions, Scale
from curvlab.optim._validation import validate_int

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "PSGDLRA",
    "precond_grad_lra",
    "psgd_lra",
    "update_precond_lra",
    "update_precond_lra_newton",
    "update_precond_lra_whiten",
]

# state keys: "step", the factor rows, the group's Lipschitz estimates, "momentum_buffer"
_FACTOR_KEYS = ("U", "V", "d")
_LIPSCHITZ_KEYS = ("L_u", "L_v", "L_d")


class PSGDLRA(ConcatenatedPSGD):
    r"""PSGD with a low-rank-approximation whitening preconditioner ``Q = (I + U Vᵀ) diag(d)``.

    One preconditioner per param group over all its parameters concatenated (``N`` entries,
    ``U, V: [N, r]``), fitted by gradient whitening (:func:`update_precond_lra_whiten`) so that
    ``P = QᵀQ ≈ E[ggᵀ]^{-1/2}`` within the family "diagonal times identity-plus-rank-r". Per step::

        p_t = preconditioner_update_probability, or precond_update_prob_schedule(t) if None
        with probability p_t: fit (U, V, d) on g (or m)
        u = P·(m if momentum else g);  u ← u·min(1, 2/RMS(u));  u ← clamp(u, ±10)   (whole group)
        θ ← θ - lr·u

    Initialisation (official): ``U, V`` Gaussian with ``‖U‖_F = ‖V‖_F = √0.1``;
    ``d = init_scale`` or ``(mean g⁴ + damping⁴)^{-1/8}`` at the first step. State, per parameter:
    its rows ``U``, ``V`` (``[numel, r]``), ``d`` (flat), ``step``, the group's Lipschitz
    estimates ``L_u, L_v, L_d`` (the same in every parameter) and ``momentum_buffer``; probes come
    from generators seeded by ``(seed, t)``, so a resumed run is bit-identical. A parameter without
    a gradient at a step is left out of that step's preconditioner.

    Args:
        params: parameters or param groups.
        lr: step size (official ``lr_params``), default 1e-3.
        rank: ``r``, in ``[0, N)``; default 10.
        **options: keyword-only ``preconditioner_lr, beta_lipschitz, damping, momentum,
            weight_decay, decoupled_weight_decay, grad_clip_max_amps,
            preconditioner_update_probability, prob_max, prob_min, prob_decay, prob_flat_start,
            init_scale, update_preconditioner_first, whiten_grad, seed, on_nonfinite``, as in
            :class:`~curvlab.optim.psgd_kron.PSGDKron`.

    Raises:
        ParameterError: a hyper-parameter out of range, an unknown option, ``rank >= N``, or a
            sparse gradient.
        NonFiniteError: a NaN/inf gradient with ``on_nonfinite="raise"``.
        StateDictError: ``load_state_dict`` with a state that does not fit.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4, 3))
        >>> opt = PSGDLRA([w], lr=0.1, rank=2, init_scale=1.0)
        >>> (w**2).sum().backward(); opt.step()
        >>> tuple(opt.state[w]["U"].shape), tuple(opt.state[w]["d"].shape)
        ((12, 2), (12,))

    Papers: X.-L. Li, "Stochastic Hessian Fittings with Lie Groups", 2024 (arXiv:2402.11858);
    O. Pooladzandi, X.-L. Li, "Curvature-Informed SGD via General Purpose Lie-Group
    Preconditioners", 2024 (arXiv:2402.04553). Code: lixilinx/psgd_torch ``psgd.py`` @a8616f1.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        rank: int = 10,
        **options: Unpack[PSGDOptions],
    ) -> None:
        super().__init__(params, {"lr": lr, "rank": rank}, options)

    _FACTOR_KEYS = _FACTOR_KEYS
    _LIPSCHITZ_KEYS = _LIPSCHITZ_KEYS

    def _validate_extra(self, group: dict[str, Any]) -> None:
        rank = validate_int("rank", group["rank"], 0)
        numel = sum(p.numel() for p in group["params"])
        if rank >= numel:
            raise ParameterError(
                f"rank must be smaller than the number of entries of the param group ({numel}), "
                f"got rank={rank}; pass a smaller rank"
            )

    def _new_factors(
        self, group: dict[str, Any], total: int, scale: Scale, ref: Tensor, gen: Generator | None
    ) -> dict[str, Tensor]:
        """``U, V`` Gaussian with ``‖U‖_F = ‖V‖_F = √0.1`` and ``d = scale`` (official)."""
        rank = int(group["rank"])
        if rank >= total:
            raise ParameterError(
                f"rank must be smaller than the number of entries it preconditions ({total}), "
                f"got rank={rank}; pass a smaller rank"
            )
        U = torch.randn(total, rank, dtype=ref.dtype, device=ref.device, generator=gen)
        U *= 0.1**0.5 / torch.linalg.vector_norm(U)
        V = torch.randn(total, rank, dtype=ref.dtype, device=ref.device, generator=gen)
        V *= 0.1**0.5 / torch.linalg.vector_norm(V)
        d = torch.ones(total, dtype=ref.dtype, device=ref.device).mul_(scale)
        return {"U": U, "V": V, "d": d}

    def _factor_shapes(self, saved_group: Mapping[str, Any], n: int) -> dict[str, tuple[int, ...]]:
        rank = int(saved_group["rank"])
        return {"U": (n, rank), "V": (n, rank), "d": (n,)}

    def _functional(self) -> Callable[..., None]:
        return psgd_lra


def psgd_lra(
    *lists: list[Any],
    precond: tuple[Tensor, Tensor, Tensor],
    pair: tuple[Tensor, Tensor] | None = None,
    **options: Unpack[PSGDStepOptions],
) -> None:
    """Functional API that performs the PSGD-LRA computation; see :class:`PSGDLRA`.

    ``lists``: ``params, grads, momentum_buffers, lipschitz, state_steps``, equally long.

    ``pair``: for ``fit="hvp"``/``"finite_difference"``, the group's ``(v, Hv)`` concatenated
    (``[N, 1]`` columns) on a refit step, ``None`` otherwise.

    ``precond = (U, V, d)``: the group's preconditioner over the parameters concatenated
    (``U``, ``V``: ``[N, r]``; ``d``: ``[N]``; updated in place); ``lipschitz[j]`` holds
    ``(L_u, L_v, L_d)`` of parameter ``j`` (the group's values, written back into every entry).
    Updates ``params``, ``momentum_buffers`` and ``state_steps`` in place. There is no
    multi-tensor path: it calls :func:`_single_tensor_psgd_lra`.
    """
    _single_tensor_psgd_lra(*lists, precond=precond, pair=pair, **options)


def _single_tensor_psgd_lra(
    *lists: list[Any],
    precond: tuple[Tensor, Tensor, Tensor],
    pair: tuple[Tensor, Tensor] | None,
    **options: Unpack[PSGDStepOptions],
) -> None:
    """The PSGD-LRA step of the class docstring (the reference,
    :func:`~curvlab.optim._psgd.concatenated_rule`): a refit step works on the concatenation; a
    step without refit applies ``P`` block by block, nothing concatenated."""
    U, V, d = precond
    dc = d.view(-1, 1)
    kw = {"lr": options["preconditioner_lr"], "beta_lipschitz": options["beta_lipschitz"]}

    def fit(L: list[Tensor], v: Tensor, h: Tensor, gen: Generator | None) -> None:
        update_precond_lra(U, V, dc, L, v, h, generator=gen, **kw)

    apply = functools.partial(precond_grad_lra, U, V, dc)
    blockwise = functools.partial(_blockwise_step, precond)
    _psgd.concatenated_rule(lists, pair, options, fit=fit, apply=apply, blockwise=blockwise)


def _blockwise_step(
    precond: tuple[Tensor, Tensor, Tensor],
    ps: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    t: int,
    options: PSGDStepOptions,
) -> None:
    """A step without refitting: :func:`precond_grad_lra` block by block, nothing concatenated.

    ``Vᵀx = Σ_j V_jᵀ x_j`` and ``Uᵀx = Σ_j U_jᵀ x_j`` are the only couplings between
    parameters; the clip uses the RMS over the whole group, as the flat rule.
    """
    momentum = float(options["momentum"])
    sizes = [p.numel() for p in ps]
    Us, Vs, ds = (x.split(sizes) for x in precond)
    ms = []
    for buf, g in zip(momentum_buffers, grads):
        if momentum > 0.0:
            assert buf is not None
            beta = min(t / (t + 1.0), momentum)
            buf.mul_(beta).add_(g.reshape(buf.shape), alpha=1.0 - beta)
            ms.append(buf.reshape(-1, 1))
        else:
            ms.append(g)
    dm = [dj.reshape(-1, 1) * m for dj, m in zip(ds, ms)]
    s1 = sum(Vj.mT @ x for Vj, x in zip(Vs, dm))
    xs = [x + Uj @ s1 for Uj, x in zip(Us, dm)]
    s2 = sum(Uj.mT @ x for Uj, x in zip(Us, xs))
    us = [dj.reshape(-1, 1) * (x + Vj @ s2) for dj, Vj, x in zip(ds, Vs, xs)]
    sq = torch.stack([torch.linalg.vector_norm(u) for u in us])
    rms = torch.linalg.vector_norm(sq) / math.sqrt(sum(sizes))
    for p, u in zip(ps, us):
        p.sub_(
            _psgd.clip_update(u, options["grad_clip_max_amps"], rms).reshape(p.shape),
            alpha=float(options["lr"]),
        )


def _ipuvt(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
    """``(I + U Vᵀ) x`` for a column ``x``."""
    return x + U @ (V.mT @ x)


def precond_grad_lra(U: Tensor, V: Tensor, d: Tensor, g: Tensor) -> Tensor:
    """``P g`` with ``P = QᵀQ``, ``Q = (I + U Vᵀ) diag(d)``: ``d ⊙ (I + V Uᵀ)(I + U Vᵀ)(d ⊙ g)``.

    ``U, V``: ``[N, r]``; ``d, g``: ``[N, 1]`` columns.

    Example:
        >>> U, V = torch.zeros(3, 1), torch.zeros(3, 1)
        >>> precond_grad_lra(U, V, torch.full((3, 1), 2.0), torch.ones(3, 1)).flatten()
        tensor([4., 4., 4.])
    """
    return d * _ipuvt(V, U, _ipuvt(U, V, d * g))


def update_precond_lra(
    U: Tensor,
    V: Tensor,
    d: Tensor,
    L: Sequence[Tensor],
    v: Tensor,
    h: Tensor,
    *,
    generator: torch.Generator | None = None,
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
) -> None:
    """Fit ``Q = (I + U Vᵀ) diag(d)`` on the pair ``(v, h)``, in place (``update_precond_lra``).

    Criterion ``E[hᵀPh + vᵀP⁻¹v]`` as for Kron. Steps, with ``L = (L_u, L_v, L_d)`` Lipschitz EMAs
    ``L ← max(β L + (1-β) ℓ, ℓ)``:

        balance: ρ = (tr UᵀU / tr VᵀV)^{1/4}; U ← U/ρ, V ← Vρ; E = 0.1 (UᵀU/ρ² - VᵀVρ²)/(…);
                 U ← U - U(E - E²/2), V ← V + V(E + E²/2)
        a = Qh, Ph = QᵀQh, b = Q^{-T} v (Woodbury with one r x r LU), P⁻¹v = b-solve / d
        d ← d - (lr/L_d)(Ph ⊙ h - v ⊙ P⁻¹v) ⊙ d,  ℓ_d = max|Ph ⊙ h| + max|v ⊙ P⁻¹v|
        with probability 1/2 (a draw from ``generator``) update U, else V, by a normalised step
        along ``a aᵀ - b bᵀ`` projected on the group of ``(I + U Vᵀ)``.

    Args:
        U, V: ``[N, r]``; d, v, h: ``[N, 1]``; L: three 0-d tensors; lr: preconditioner step;
        beta_lipschitz: EMA factor; generator: source of the U-or-V coin.
    """
    Lu, Lv, Ld = L
    UtU, VtV = U.mT @ U, V.mT @ V
    tr_u, tr_v = UtU.diagonal().sum(), VtV.diagonal().sum()
    rho = (tr_u / tr_v) ** 0.25
    rho2 = rho * rho
    E = 0.1 * (UtU / rho2 - VtV * rho2) / (tr_u / rho2 + tr_v * rho2)
    E2 = 0.5 * E @ E
    U.div_(rho)
    V.mul_(rho)
    U.sub_(U @ (E - E2))
    V.add_(V @ (E + E2))

    Qh = _ipuvt(U, V, d * h)
    Ph = d * _ipuvt(V, U, Qh)
    IpVtU = V.mT @ U
    IpVtU.diagonal().add_(1)
    inv_qt_v = v / d
    # I + VᵀU is checked for a zero pivot where that is free (the host); on an accelerator the
    # check would synchronise every fit (the fit's normalised steps are meant to keep it
    # invertible; a zero pivot there gives non-finite factors instead of an error)
    check = IpVtU.device.type == "cpu"
    LU, piv, _ = torch.linalg.lu_factor_ex(_psgd.lift(IpVtU), check_errors=check)
    rhs = _psgd.lift(U.mT @ inv_qt_v)
    inv_qt_v = inv_qt_v - V @ torch.linalg.lu_solve(LU, piv, rhs, adjoint=True).to(V.dtype)
    rhs = _psgd.lift(V.mT @ inv_qt_v)
    inv_pv = inv_qt_v - U @ torch.linalg.lu_solve(LU, piv, rhs).to(U.dtype)
    inv_pv = inv_pv / d

    phh, vipv = Ph * h, v * inv_pv
    ell = torch.max(torch.abs(phh)) + torch.max(torch.abs(vipv))
    ld = _psgd.update_lipschitz(Ld, ell, beta_lipschitz)
    d.sub_((lr / ld).to(d.dtype) * (phh - vipv) * d)

    a, b = Qh, inv_qt_v
    if _psgd.host_uniform(generator) < 0.5:
        atV, btV = a.mT @ V, b.mT @ V
        ell = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(
            atV @ V.mT
        ) + torch.linalg.vector_norm(b) * torch.linalg.vector_norm(btV @ V.mT)
        lu = _psgd.update_lipschitz(Lu, ell, beta_lipschitz)
        U.sub_((lr / lu).to(U.dtype) * (a @ (atV @ IpVtU) - b @ (btV @ IpVtU)))
    else:
        atU, btU = a.mT @ U, b.mT @ U
        ell = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(
            U @ atU.mT
        ) + torch.linalg.vector_norm(b) * torch.linalg.vector_norm(U @ btU.mT)
        lv = _psgd.update_lipschitz(Lv, ell, beta_lipschitz)
        V.sub_((lr / lv).to(V.dtype) * ((a + V @ atU.mT) @ atU - (b + V @ btU.mT) @ btU))


def update_precond_lra_whiten(
    U: Tensor,
    V: Tensor,
    d: Tensor,
    L: Sequence[Tensor],
    g: Tensor,
    *,
    generator: torch.Generator | None = None,
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
) -> None:
    """Whitening fit: ``v ~ N(0, I)`` (first draw), ``h = g + (damping + ε|g|) ⊙ v``, then
    :func:`update_precond_lra` (official ``update_precond_lra_whiten``); in place."""
    v, h = _psgd.whitening_probe(g, damping, generator)
    update_precond_lra(U, V, d, L, v, h, generator=generator, lr=lr, beta_lipschitz=beta_lipschitz)


def update_precond_lra_newton(
    U: Tensor,
    V: Tensor,
    d: Tensor,
    L: Sequence[Tensor],
    v: Tensor,
    h: Tensor,
    *,
    generator: torch.Generator | None = None,
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
) -> None:
    """Newton-type fit on a pair ``(v, h = H v)``: ``h ← h + (damping + ε|h|) ⊙ n``, ``n ~ N(0, I)``
    (first draw from ``generator``), then :func:`update_precond_lra` (official
    ``update_precond_lra_newton``); in place. The fixed point is ``P = |H|⁻¹`` within the family."""
    h = _psgd.pair_damped(h, damping, generator)
    update_precond_lra(U, V, d, L, v, h, generator=generator, lr=lr, beta_lipschitz=beta_lipschitz)
