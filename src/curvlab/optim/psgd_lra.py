"""PSGD with a low-rank-approximation (LRA) whitening preconditioner (Xi-Lin Li).

Faithful to the official code, lixilinx/psgd_torch ``psgd.py`` at commit a8616f1 (2026-04-02):
``update_precond_lra``, ``precond_grad_lra``, ``update_precond_lra_whiten`` and ``LRAWhiten.step``
(one preconditioner over all parameters of a param group, concatenated), with the decoupled weight
decay and update-probability handling of :class:`~curvlab.optim.psgd_kron.PSGDKron`. The rules were
re-written from reading; nothing was copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.errors import ParameterError, StateDictError
from curvlab.optim._validation import (
    check_finite_grads,
    match_param_groups,
    next_step_number,
    validate_in_range,
    validate_lr,
    validate_nonnegative,
    validate_on_nonfinite,
    validate_weight_decay,
)
from curvlab.optim.psgd_kron import (
    _lift,
    _mix_seed,
    _update_lipschitz,
    coin_seed,
    precond_update_prob_schedule,
)

__all__ = [
    "PSGDLRA",
    "precond_grad_lra",
    "update_precond_lra",
    "update_precond_lra_whiten",
]


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
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
    generator: torch.Generator | None = None,
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
    LU, piv = torch.linalg.lu_factor(_lift(IpVtU))
    rhs = _lift(U.mT @ inv_qt_v)
    inv_qt_v = inv_qt_v - V @ torch.linalg.lu_solve(LU, piv, rhs, adjoint=True).to(V.dtype)
    rhs = _lift(V.mT @ inv_qt_v)
    inv_pv = inv_qt_v - U @ torch.linalg.lu_solve(LU, piv, rhs).to(U.dtype)
    inv_pv = inv_pv / d

    phh, vipv = Ph * h, v * inv_pv
    ell = torch.max(torch.abs(phh)) + torch.max(torch.abs(vipv))
    ld = _update_lipschitz(Ld, ell, beta_lipschitz)
    d.sub_((lr / ld).to(d.dtype) * (phh - vipv) * d)

    a, b = Qh, inv_qt_v
    if torch.rand([], generator=generator, device=U.device).item() < 0.5:
        atV, btV = a.mT @ V, b.mT @ V
        ell = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(
            atV @ V.mT
        ) + torch.linalg.vector_norm(b) * torch.linalg.vector_norm(btV @ V.mT)
        lu = _update_lipschitz(Lu, ell, beta_lipschitz)
        U.sub_((lr / lu).to(U.dtype) * (a @ (atV @ IpVtU) - b @ (btV @ IpVtU)))
    else:
        atU, btU = a.mT @ U, b.mT @ U
        ell = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(
            U @ atU.mT
        ) + torch.linalg.vector_norm(b) * torch.linalg.vector_norm(U @ btU.mT)
        lv = _update_lipschitz(Lv, ell, beta_lipschitz)
        V.sub_((lr / lv).to(V.dtype) * ((a + V @ atU.mT) @ atU - (b + V @ btU.mT) @ btU))


def update_precond_lra_whiten(
    U: Tensor,
    V: Tensor,
    d: Tensor,
    L: Sequence[Tensor],
    g: Tensor,
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    generator: torch.Generator | None = None,
) -> None:
    """Whitening fit: ``v ~ N(0, I)`` (first draw), ``h = g + (damping + ε|g|) ⊙ v``, then
    :func:`update_precond_lra` (official ``update_precond_lra_whiten``); in place."""
    v = torch.randn(g.shape, dtype=g.dtype, device=g.device, generator=generator)
    h = torch.addcmul(g, g.abs().mul_(torch.finfo(g.dtype).eps).add_(damping), v)
    update_precond_lra(U, V, d, L, v, h, lr, beta_lipschitz, generator)


class PSGDLRA(Optimizer):
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
        preconditioner_lr, beta_lipschitz, damping, momentum, weight_decay,
        decoupled_weight_decay, grad_clip_max_amps, preconditioner_update_probability,
        prob_max, prob_min, prob_decay, prob_flat_start, init_scale, update_preconditioner_first,
        whiten_grad, seed, on_nonfinite: as in :class:`~curvlab.optim.psgd_kron.PSGDKron`.

    Raises:
        ParameterError: a hyper-parameter out of range, ``rank >= N``, or a sparse gradient.
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

    closure_mode: ClassVar[str] = "backward"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        rank: int = 10,
        preconditioner_lr: float = 0.1,
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        grad_clip_max_amps: tuple[float, float] = (2.0, 10.0),
        preconditioner_update_probability: float | None = None,
        prob_max: float = 1.0,
        prob_min: float = 0.03,
        prob_decay: float = 0.001,
        prob_flat_start: int = 500,
        init_scale: float | None = None,
        update_preconditioner_first: bool = True,
        whiten_grad: bool = True,
        seed: int = 0,
        on_nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            rank=rank,
            preconditioner_lr=preconditioner_lr,
            beta_lipschitz=beta_lipschitz,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            grad_clip_max_amps=tuple(grad_clip_max_amps)
            if isinstance(grad_clip_max_amps, (tuple, list))
            else grad_clip_max_amps,
            preconditioner_update_probability=preconditioner_update_probability,
            prob_max=prob_max,
            prob_min=prob_min,
            prob_decay=prob_decay,
            prob_flat_start=prob_flat_start,
            init_scale=init_scale,
            update_preconditioner_first=update_preconditioner_first,
            whiten_grad=whiten_grad,
            seed=seed,
            on_nonfinite=on_nonfinite,
            nonfinite_skips=0,
        )
        _validate_group(defaults, None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated, including ``rank < number of entries``)."""
        super().add_param_group(param_group)
        if hasattr(self, "defaults"):
            group = self.param_groups[-1]
            _validate_group(group, sum(p.numel() for p in group["params"]))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("on_nonfinite", "raise")
            group.setdefault("nonfinite_skips", 0)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float | Tensor] | None = None
    ) -> float | Tensor | None:
        """Take one step; ``closure`` (optional) zeroes grads, computes the loss, calls backward.

        Returns:
            the closure's loss, or ``None`` without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the step number is read from the state only when an error message needs it
        if not check_finite_grads(self.param_groups, step=lambda: next_step_number(self)):
            return loss
        for group in self.param_groups:
            self._group_step(group)
        return loss

    def _group_step(self, group: dict[str, Any]) -> None:
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        grads = []
        for p in ps:
            g = p.grad
            assert g is not None
            if wd != 0.0:
                if group["decoupled_weight_decay"]:
                    p.mul_(1.0 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            grads.append(g.reshape(-1, 1))
        new = [p for p in ps if len(self.state[p]) == 0]
        if new:
            self._init_states(group, new, torch.cat(grads), ps)
        first = self.state[ps[0]]
        t = int(first["step"].item())
        update = _coin(group, t)
        if not update:
            self._apply_blockwise(group, ps, grads, t)
            return
        g = torch.cat(grads)
        U, V, d = (self._flat(ps, key) for key in ("U", "V", "d"))
        d = d.view(-1, 1)
        L = [first["L_u"].clone(), first["L_v"].clone(), first["L_d"].clone()]
        momentum = float(group["momentum"])
        if momentum > 0.0:
            m = torch.cat([self.state[p]["momentum_buffer"].reshape(-1, 1) for p in ps])
            beta = min(t / (t + 1.0), momentum)
            m.mul_(beta).add_(g, alpha=1.0 - beta)
        else:
            m = g
        gen = torch.Generator(device=g.device)
        gen.manual_seed(_mix_seed(int(group["seed"]), t, 1))
        target = g if group["whiten_grad"] else m
        args = (float(group["preconditioner_lr"]), float(group["beta_lipschitz"]))
        damping = float(group["damping"])
        if update and group["update_preconditioner_first"]:
            update_precond_lra_whiten(U, V, d, L, target, *args, damping, gen)
        u = precond_grad_lra(U, V, d, m)
        if update and not group["update_preconditioner_first"]:
            update_precond_lra_whiten(U, V, d, L, target, *args, damping, gen)
        max_avg, max_elem = group["grad_clip_max_amps"]
        rms = torch.linalg.vector_norm(u) / math.sqrt(u.numel())
        u = u.mul_(torch.clamp(max_avg / rms, max=1.0)).clamp_(-max_elem, max_elem)
        start = 0
        for p in ps:
            n = p.numel()
            st = self.state[p]
            p.sub_(u[start : start + n].reshape(p.shape), alpha=lr)
            if momentum > 0.0:
                st["momentum_buffer"].copy_(m[start : start + n].reshape(p.shape))
            for key, value in zip(("L_u", "L_v", "L_d"), L):
                st[key].copy_(value)
            st["step"] += 1
            start += n

    def _flat(self, ps: list[Tensor], key: str) -> Tensor:
        """The group's ``U``, ``V`` or ``d`` as one tensor whose row blocks are the state entries.

        The per-parameter entries are kept as consecutive views of one buffer, so the refit runs
        in place on the concatenation without copying. If they are not (after a parameter was
        left out of a step, or a ``load_state_dict`` that cast them), they are concatenated once
        and the state entries are re-pointed to views of the new buffer.
        """
        tensors = [self.state[p][key] for p in ps]
        first = tensors[0]
        storage = first.untyped_storage()
        offset = first.storage_offset()
        rows = sum(t.shape[0] for t in tensors)
        shape = (rows, *first.shape[1:])
        ok = True
        for t in tensors:
            ok = ok and t.is_contiguous() and t.untyped_storage().data_ptr() == storage.data_ptr()
            ok = ok and t.storage_offset() == offset and t.dtype == first.dtype
            offset += t.numel()
        if ok and offset <= storage.nbytes() // first.element_size():
            flat = first.new_empty(0)
            stride = (shape[1], 1) if len(shape) == 2 else (1,)
            return flat.set_(storage, first.storage_offset(), shape, stride)
        flat = torch.cat(tensors)
        start = 0
        for p, t in zip(ps, tensors):
            self.state[p][key] = flat[start : start + t.shape[0]]
            start += t.shape[0]
        return flat

    def _apply_blockwise(
        self, group: dict[str, Any], ps: list[Tensor], grads: list[Tensor], t: int
    ) -> None:
        """A step without refitting: :func:`precond_grad_lra` block by block, nothing concatenated.

        ``Vᵀx = Σ_j V_jᵀ x_j`` and ``Uᵀx = Σ_j U_jᵀ x_j`` are the only couplings between
        parameters; the clip uses the RMS over the whole group, as the flat rule.
        """
        lr = float(group["lr"])
        momentum = float(group["momentum"])
        states = [self.state[p] for p in ps]
        ms = []
        for st, g in zip(states, grads):
            if momentum > 0.0:
                beta = min(t / (t + 1.0), momentum)
                buf = st["momentum_buffer"]
                buf.mul_(beta).add_(g.reshape(buf.shape), alpha=1.0 - beta)
                ms.append(buf.reshape(-1, 1))
            else:
                ms.append(g)
        dm = [st["d"].reshape(-1, 1) * m for st, m in zip(states, ms)]
        s1 = sum(st["V"].mT @ x for st, x in zip(states, dm))
        xs = [x + st["U"] @ s1 for st, x in zip(states, dm)]
        s2 = sum(st["U"].mT @ x for st, x in zip(states, xs))
        us = [st["d"].reshape(-1, 1) * (x + st["V"] @ s2) for st, x in zip(states, xs)]
        total = sum(u.numel() for u in us)
        sq = torch.stack([torch.linalg.vector_norm(u) for u in us])
        rms = torch.linalg.vector_norm(sq) / math.sqrt(total)
        max_avg, max_elem = group["grad_clip_max_amps"]
        scale = torch.clamp(max_avg / rms, max=1.0)
        for p, st, u in zip(ps, states, us):
            p.sub_(u.mul_(scale).clamp_(-max_elem, max_elem).reshape(p.shape), alpha=lr)
            st["step"] += 1

    def _init_states(
        self, group: dict[str, Any], new: list[Tensor], g: Tensor, ps: list[Tensor]
    ) -> None:
        """Official initialisation over the new parameters (all of them at the first step)."""
        rank = int(group["rank"])
        sizes = [p.numel() for p in new]
        total = sum(sizes)
        if rank >= total:
            raise ParameterError(
                f"rank must be smaller than the number of entries it preconditions ({total}), "
                f"got rank={rank}; pass a smaller rank"
            )
        ref = new[0]
        gen = torch.Generator(device=ref.device)
        gen.manual_seed(_mix_seed(int(group["seed"]), -1, 0))
        U = torch.randn(total, rank, dtype=ref.dtype, device=ref.device, generator=gen)
        U *= 0.1**0.5 / torch.linalg.vector_norm(U)
        V = torch.randn(total, rank, dtype=ref.dtype, device=ref.device, generator=gen)
        V *= 0.1**0.5 / torch.linalg.vector_norm(V)
        scale = group["init_scale"]
        if scale is None:
            offsets, start = {}, 0
            for p in ps:
                offsets[p] = start
                start += p.numel()
            gn = torch.cat([g[offsets[p] : offsets[p] + p.numel()] for p in new])
            s4 = torch.mean(_lift(gn) ** 4).item()
            scale = (s4 + float(group["damping"]) ** 4) ** (-1.0 / 8.0)
        ldtype = _lift(torch.empty(0, dtype=ref.dtype)).dtype
        d = torch.full((total,), float(scale), dtype=ref.dtype, device=ref.device)
        start = 0
        for p, n in zip(new, sizes):
            st = self.state[p]
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["U"] = U[start : start + n]
            st["V"] = V[start : start + n]
            st["d"] = d[start : start + n]
            for key in ("L_u", "L_v", "L_d"):
                st[key] = torch.zeros([], dtype=ldtype, device=p.device)
            if group["momentum"] > 0.0:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            start += n

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, after checking its layout.

        Raises:
            StateDictError: the number of groups or parameters, the keys or the shapes differ.
        """
        _check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)
        id_to_param: dict[Any, Tensor] = {}
        for sg, g in zip(state_dict["param_groups"], self.param_groups):
            id_to_param.update(zip(sg["params"], g["params"]))
        for pid, st in state_dict["state"].items():
            p = id_to_param[pid]
            for key in ("L_u", "L_v", "L_d"):
                if isinstance(st.get(key), Tensor):
                    self.state[p][key] = st[key].to(device=p.device, copy=True)


def _coin(group: dict[str, Any], t: int) -> bool:
    p = group["preconditioner_update_probability"]
    if p is None:
        p = precond_update_prob_schedule(
            t, group["prob_max"], group["prob_min"], group["prob_decay"], group["prob_flat_start"]
        )
    gen = torch.Generator().manual_seed(coin_seed(int(group["seed"]), t))
    return torch.rand([], generator=gen).item() < p


def _validate_group(group: dict[str, Any], numel: int | None) -> None:
    def num(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        validate_in_range(name, group[name], lo, hi, lo_open=lo_open, hi_open=hi_open)

    validate_lr(group["lr"])
    validate_weight_decay(group["weight_decay"])
    validate_nonnegative("damping", group["damping"], "; the official default is 1e-9")
    validate_on_nonfinite(group["on_nonfinite"])
    rank = group["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ParameterError(f"rank must be an int >= 0, got {rank!r}")
    if numel is not None and rank >= numel:
        raise ParameterError(
            f"rank must be smaller than the number of entries of the param group ({numel}), "
            f"got rank={rank}; pass a smaller rank"
        )
    num("preconditioner_lr", 0.0, 1.0, lo_open=True, hi_open=True)
    num("beta_lipschitz", 0.0, 1.0)
    num("momentum", 0.0, 1.0, hi_open=True)
    amps = group["grad_clip_max_amps"]
    if (
        not isinstance(amps, (tuple, list))
        or len(amps) != 2
        or not all(isinstance(a, (int, float)) and a > 0 for a in amps)
    ):
        raise ParameterError(
            f"grad_clip_max_amps must be two positive numbers (max RMS, max |entry|), got {amps!r}"
        )
    if group["preconditioner_update_probability"] is not None:
        num("preconditioner_update_probability", 0.0, 1.0, lo_open=True)
    else:
        num("prob_max", 0.0, 1.0, lo_open=True)
        num("prob_min", 0.0, group["prob_max"])
        num("prob_decay", 0.0, math.inf, hi_open=True)
        num("prob_flat_start", 0.0, math.inf, hi_open=True)
    if group["init_scale"] is not None:
        num("init_scale", 0.0, math.inf, lo_open=True, hi_open=True)
    if not group["whiten_grad"] and not group["momentum"] > 0.0:
        raise ParameterError(
            "whiten_grad=False whitens the momentum, which needs momentum > 0; pass e.g. "
            "momentum=0.9 or whiten_grad=True"
        )
    if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
        raise ParameterError(f"seed must be an int, got {group['seed']!r}")


_KEYS = {"step", "U", "V", "d", "L_u", "L_v", "L_d", "momentum_buffer"}


def _check_state_dict(opt: PSGDLRA, state_dict: dict[str, Any]) -> None:
    groups = state_dict["param_groups"] if isinstance(state_dict, dict) else []
    id_to_param: dict[Any, tuple[Tensor, int]] = {
        pid: (p, int(groups[gi]["rank"]))
        for pid, (gi, _, p) in match_param_groups(opt, state_dict).items()
    }
    for pid, st in state_dict["state"].items():
        if pid not in id_to_param:
            raise StateDictError(f"state_dict holds state for unknown parameter id {pid!r}")
        p, rank = id_to_param[pid]
        extra = sorted(set(st) - _KEYS)
        if extra:
            raise StateDictError(
                f"state of parameter id {pid!r} has keys {extra} that PSGDLRA does not use: the "
                "state_dict was saved from another optimizer"
            )
        for key, shape in (("U", (p.numel(), rank)), ("V", (p.numel(), rank)), ("d", (p.numel(),))):
            value = st.get(key)
            if value is None or tuple(value.shape) != shape:
                got = None if value is None else tuple(value.shape)
                raise StateDictError(
                    f"state {key!r} of parameter id {pid!r} has shape {got}, expected {shape} for "
                    f"a parameter of shape {tuple(p.shape)}; the state_dict was saved for a "
                    "different model or another optimizer"
                )
