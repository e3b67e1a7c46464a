"""PSGD with a Kronecker-factored whitening preconditioner (Xi-Lin Li's "PSGD Kron").

Faithful to the official code, lixilinx/psgd_torch ``psgd.py`` at commit a8616f1 (2026-04-02):
``init_kron``, ``update_precond_kron_eq`` + ``update_precond_kron_whiten_eq`` (geometry ``"EQ"``,
the default here), ``update_precond_kron_whiten_q0p5eq1p5`` + ``procrustes_step2`` (geometry
``"Q0.5EQ1.5"``, the official default), ``norm_lower_bound_spd/skh``, ``balance_kron_precond``,
``precond_grad_kron`` and the step of ``KronWhiten`` (momentum, clipping), with the decoupled weight
decay of ``wrapped_as_torch_optimizer_for_ddp.py`` (``KWNS4``). The update-probability schedule is
kron-torch's ``precond_update_prob_schedule``; the official torch.optim wrapper asks to "quickly
anneal" the update probability to 0.01–0.1 but ships no schedule. Nothing was copied; the rules
were re-written from reading.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvlab.errors import StateDictError
from curvlab.optim._psgd import (
    Pairs,
    PSGDBase,
    PSGDOptions,
    PSGDStepOptions,
    clip_update,
    coin_seed,
    fit_options,
    host_uniform,
    init_grad,
    init_scale,
    lift,
    lipschitz_dtype,
    pair_damped,
    pair_init_scale,
    precond_update_prob_schedule,
    probe_seed,
    seeded_generator,
    update_coin,
    update_lipschitz,
    whitening_probe,
    wide,
)
from curvlab.optim._validation import group_options, validate_choice, validate_in_range

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "PSGDKron",
    "balance_factors",
    "coin_seed",
    "factor_kinds",
    "init_factors",
    "kron_precondition",
    "norm_lower_bound_skew",
    "norm_lower_bound_spd",
    "precond_update_prob_schedule",
    "probe_seed",
    "procrustes_step",
    "psgd_kron",
    "update_precond_kron_eq",
    "update_precond_kron_newton",
    "update_precond_kron_whiten",
]

_STATE_KEYS = ("step", "momentum_buffer")  # plus Q_i and L_i, i < number of squeezed dims

GEOMETRIES: tuple[str, ...] = ("EQ", "Q0.5EQ1.5")
_NORM_BOUND_K = 32  # subspace dimension of the official spectral-norm lower bound (float32 setting)
_BALANCE_PROB = 0.01  # official probability of rebalancing the factor magnitudes per update
#: largest dim with a dense factor by default (kron-torch's ``max_size_triangular``)
MAX_SIZE = 8192
#: floor of the default update-probability schedule: the author's scripts anneal to 0.01
PROB_MIN = 0.01


class PSGDKron(PSGDBase):
    r"""PSGD with a Kronecker-factored whitening preconditioner fitted on a Lie group (Li).

    Each parameter ``θ`` (squeezed to ``k`` dims) gets ``Q = Q_1 ⊗ ... ⊗ Q_k`` and ``P = QᵀQ``.
    The factors are upper-triangular (geometry ``"EQ"``, default) or near-SPD (``"Q0.5EQ1.5"``,
    the official default) ``d_i x d_i`` matrices, or diagonals for large or skewed dims
    (:func:`factor_kinds`). ``Q`` is fitted by gradient whitening, with no Hessian-vector product:
    with ``v ~ N(0, I)`` and ``h = g + (damping + ε|g|) v`` it minimises ``E[hᵀPh + vᵀP⁻¹v]``,
    whose minimiser is ``P = E[hhᵀ]^{-1/2}``, by normalised steps on the group
    (:func:`update_precond_kron_whiten`). Per step (:func:`psgd_kron`)::

        p_t = preconditioner_update_probability, or precond_update_prob_schedule(t) if None
        with probability p_t (a coin seeded by (seed, t)):  fit Q on g (or on m)
        u = P·(m if momentum else g);  u ← u·min(1, 2/RMS(u));  u ← clamp(u, ±10)
        θ ← θ - lr·u

    Defaults are the official ``KronWhiten`` ones (lr 1e-3, preconditioner_lr 0.1, betaL 0.9,
    damping 1e-9, momentum 0, clip (2, 10), max_skew 1, automatic init scale) with the
    memory-saving choices of the author's own runs and of kron-torch:

    * ``max_size = 8192``: larger dims get a diagonal factor (kron-torch's
      ``max_size_triangular``; ``KronWhiten``'s default is ∞). With ``max_skew = 1`` the larger
      side of a non-square matrix is diagonal and vectors are diagonal (kron-torch's
      ``memory_save_mode="smart_one_diag"`` and ``min_ndim_triangular=2`` for matrices and
      vectors), so a dense factor never holds more entries than its parameter.
    * the update probability anneals: 1 for 500 steps, then ``exp(-0.001 (t - 500))`` down to a
      floor of ``prob_min = 0.01`` (reached near step 5,100), the value the author's GPT-2 and
      ViT scripts (``misc/gpt2.py``, ``misc/vit.py``) anneal ``preconditioner_update_probability``
      to; kron-torch's schedule shape (:func:`precond_update_prob_schedule`, whose own floor is
      0.03). Pass ``preconditioner_update_probability=1.0`` for ``KronWhiten``'s every-step fit.

    Cost, measured at 10M parameters (an MLP with two 2048 × 2560 weights, one dense 2048 factor
    each; ``benchmarks/optim_step_time.py``, CPU, 1 thread, two runs at load average 10–13): a
    step that only applies ``P`` takes 8.0–8.7× the time of torch's ``AdamW(foreach=True)``, one
    that also fits ``Q`` 28–30×; with the default schedule that averages to 26× over the first
    1,000 steps, 11× over 10,000 and 8.5× over 100,000.

    Randomness is reproducible and resumable: the probes of the ``j``-th parameter of a group at
    step ``t`` come from a fresh ``torch.Generator`` seeded with a hash of ``(seed, t, j)``, and
    the update coin from one seeded with ``(seed, t)``; within a tensor the draws follow the
    official order. The state holds only tensors (``step``; the factors ``Q_0 … Q_{k-1}``; the
    Lipschitz estimates ``L_0 … L_{k-1}``, float32 for half-precision parameters;
    ``momentum_buffer``), so a resumed run is bit-identical.

    The keyword-only options below are shared with :class:`~curvlab.optim.psgd_lra.PSGDLRA`
    (``curvlab.optim._psgd.PSGDOptions``).

    Args:
        params: parameters or param groups.
        lr: step size (official ``lr_params``), default 1e-3.
        max_size, max_skew: the dense/diagonal rule of :func:`factor_kinds` (keyword-only;
            defaults 8192 and 1).
        geometry: ``"EQ"`` (triangular group, ``dQ = E Q``) or ``"Q0.5EQ1.5"`` (keyword-only).

    Keyword Args:
        preconditioner_lr: step size of the preconditioner fit (``lr_preconditioner``), in (0, 1).
        beta_lipschitz: EMA factor of the Lipschitz estimate (``betaL``), in [0, 1].
        damping: noise level added to the whitened vector (``P < I/damping``), >= 0.
        momentum: ``β`` of the gradient EMA (no bias correction), in [0, 1); 0 disables.
        weight_decay: >= 0; decoupled (``θ ← θ(1 - lr·wd)``) unless
            ``decoupled_weight_decay=False`` (then ``g ← g + wd·θ``).
        grad_clip_max_amps: ``(max RMS, max |entry|)`` of the preconditioned update.
        preconditioner_update_probability: a number in (0, 1], or ``None`` (default) for the
            schedule of ``prob_max, prob_min, prob_decay, prob_flat_start`` (defaults 1, 0.01,
            0.001, 500; :func:`precond_update_prob_schedule`).
        init_scale: initial ``Q = init_scale·I``; ``None`` sets it at the first step to
            ``(max_j mean|g_j|⁴ + damping⁴)^{-1/8}`` over the group's new parameters (official).
        update_preconditioner_first: fit ``Q`` before applying it (biased) or after (unbiased).
        whiten_grad: whiten the gradient (True) or the momentum (False; needs ``momentum > 0``).
        seed: integer seed of the probe and coin streams.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` a step whose gradients
            hold NaN/inf (see ``curvlab.optim._validation``).

    Raises:
        ParameterError: a hyper-parameter out of range (the message names it and its range), an
            unknown option, or a sparse gradient.
        NonFiniteError: a NaN/inf gradient with ``on_nonfinite="raise"``; nothing is changed.
        StateDictError: ``load_state_dict`` with a state that does not fit.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3, 2))
        >>> opt = PSGDKron([w], lr=0.1, init_scale=1.0)
        >>> (w**2).sum().backward(); opt.step()
        >>> tuple(opt.state[w]["Q_0"].shape), tuple(opt.state[w]["Q_1"].shape)
        ((3,), (2, 2))

    Papers: X.-L. Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018
    (arXiv:1512.04202); X.-L. Li, "Preconditioner on Matrix Lie Group for SGD", ICLR 2019
    (arXiv:1809.10232); O. Pooladzandi, X.-L. Li, "Curvature-Informed SGD via General Purpose
    Lie-Group Preconditioners", 2024 (arXiv:2402.04553); X.-L. Li, "Stochastic Hessian Fittings
    with Lie Groups", 2024 (arXiv:2402.11858). Code: lixilinx/psgd_torch ``psgd.py`` @a8616f1.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        max_size: float = MAX_SIZE,
        max_skew: float = 1.0,
        geometry: str = "EQ",
        **options: Unpack[PSGDOptions],
    ) -> None:
        own = {"lr": lr, "max_size": max_size, "max_skew": max_skew, "geometry": geometry}
        super().__init__(params, own, {"prob_min": PROB_MIN, **options})

    def _validate_extra(self, group: dict[str, Any]) -> None:
        validate_in_range("max_size", group["max_size"], 0.0, math.inf)
        validate_in_range("max_skew", group["max_skew"], 0.0, math.inf)
        validate_choice("geometry", group["geometry"], GEOMETRIES)

    def _init_group(self, group: dict[str, Any], pairs: Pairs | None, *lists: list[Any]) -> None:
        """Create the state of new parameters (one initial scale for all of them, official, from
        the gradients or, for a pair fit, from the pairs); append every parameter with a gradient
        to ``lists = (params, grads, factors, lipschitz, momentum_buffers, state_steps,
        generators, pairs)``, its probe generator seeded by ``(seed, step, index in the group)``.
        """
        new = [p for p in group["params"] if p.grad is not None and len(self.state[p]) == 0]
        if new:
            scale = group["init_scale"]
            if scale is None and pairs:
                vs, hs = zip(*(pairs[p] for p in new))
                scale = pair_init_scale(list(vs), list(hs), float(group["damping"]))
            elif scale is None:
                dev = new[0].device
                s4 = [wide(torch.mean(lift(init_grad(p, group)).abs() ** 4)).to(dev) for p in new]
                scale = init_scale(torch.stack(s4).amax(), float(group["damping"]))
            for p in new:
                kinds = factor_kinds(p.shape, group["max_size"], group["max_skew"])
                Q = init_factors(p.shape, kinds, scale, p.dtype, p.device)
                state = self.state[p]
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for i, q in enumerate(Q):
                    state[f"Q_{i}"] = q
                for i in range(len(Q)):
                    state[f"L_{i}"] = torch.zeros(
                        [], dtype=lipschitz_dtype(p.dtype), device=p.device
                    )
                if group["momentum"] > 0.0:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            k = _num_factors(p.shape)
            t = int(state["step"].item())
            gen = seeded_generator(probe_seed(int(group["seed"]), t, index), p.device)
            factors = [state[f"Q_{i}"] for i in range(k)]
            lipschitz = [state[f"L_{i}"] for i in range(k)]
            buf = state.get("momentum_buffer")
            pair = None if pairs is None else pairs.get(p)
            entries = (p, p.grad, factors, lipschitz, buf, state["step"], gen, pair)
            for lst, entry in zip(lists, entries):
                lst.append(entry)

    def _step_group(self, group: dict[str, Any], pairs: Pairs | None) -> None:
        lists: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
        self._init_group(group, pairs, *lists)
        psgd_kron(*lists, geometry=group["geometry"], **group_options(group, PSGDStepOptions))

    def _state_layout(self) -> tuple[list[str], list[str], list[str]]:
        k = max((_num_factors(p.shape) for g in self.param_groups for p in g["params"]), default=1)
        qs, ls = [f"Q_{i}" for i in range(k)], [f"L_{i}" for i in range(k)]
        return [*_STATE_KEYS, *qs, *ls], qs, ls

    def _check_shapes(self, state_dict: Mapping[str, Any]) -> None:
        for sg, g in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                st = state_dict["state"].get(pid)
                if st is not None:
                    _check_param_state(pid, p, st)


def psgd_kron(*lists: list[Any], geometry: str, **options: Unpack[PSGDStepOptions]) -> None:
    """Functional API that performs the PSGD-Kron computation; see :class:`PSGDKron`.

    ``lists``: ``params, grads, factors, lipschitz, momentum_buffers, state_steps, generators,
    pairs``, equally long. Updates ``params``, their ``factors`` (``Q_0 … Q_{k-1}``), ``lipschitz`` estimates,
    ``momentum_buffers`` (``None`` without momentum) and ``state_steps`` in place; the probes of
    parameter ``j`` come from ``generators[j]``. With ``options["fit"]`` ``"hvp"`` or
    ``"finite_difference"``, ``pairs[j]`` is the ``(v, Hv)`` of parameter ``j`` on a refit step
    and ``None`` otherwise. There is no multi-tensor path (each factor is a different small
    matrix): it calls :func:`_single_tensor_psgd_kron`.
    """
    _single_tensor_psgd_kron(*lists, geometry=geometry, **options)


def _single_tensor_psgd_kron(
    *lists: list[Any], geometry: str, **options: Unpack[PSGDStepOptions]
) -> None:
    """One PSGD-Kron step for each parameter, in place: the reference.

    Rule (official ``KronWhiten.step`` / ``KWNS4.step``), ``t`` completed steps before this
    one (the coin is :func:`~curvlab.optim._psgd.update_coin` at ``t``):

        weight decay: θ ← θ(1 - lr·wd) (decoupled)  or  g ← g + wd·θ (coupled)
        momentum:     β_t = min(t/(t+1), momentum);  m ← β_t m + (1-β_t) g        (no bias
        correction)
        if coin and update_preconditioner_first: fit Q on (g if whiten_grad else m)
        u = P (m if momentum > 0 else g)
        if coin and not update_preconditioner_first: fit Q (after use; unbiased)
        u ← u · min(1, c₁ / RMS(u));  u ← clamp(u, -c₂, c₂)     with (c₁, c₂) = grad_clip_max_amps
        θ ← θ - lr · u

    The gradient is squeezed (size-1 dims dropped) before the preconditioner sees it. A pair fit
    (``fit="hvp"``/``"finite_difference"``) refits exactly when a pair is given, on that pair
    (:func:`update_precond_kron_newton`), instead of whitening.
    """
    lr, wd, momentum = options["lr"], options["weight_decay"], options["momentum"]
    whiten = options.get("fit", "whiten") == "whiten"
    fit = functools.partial(update_precond_kron_whiten, geometry=geometry, **fit_options(options))
    newton = functools.partial(
        update_precond_kron_newton, geometry=geometry, **fit_options(options)
    )
    for param, grad, Q, L, buf, step_t, gen, pair in zip(*lists):
        step = int(step_t.item())
        coin = update_coin(options, step) if whiten else pair is not None
        if wd != 0.0:
            if options["decoupled_weight_decay"]:
                param.mul_(1.0 - lr * wd)
            else:
                grad = grad.add(param, alpha=wd)
        g = grad.squeeze()
        if momentum > 0.0:
            beta = min(step / (step + 1.0), momentum)
            buf.mul_(beta).add_(g.reshape_as(buf), alpha=1.0 - beta)
            m = buf.view_as(g)
        else:
            m = g
        target = g if options["whiten_grad"] else m
        refit, args = (
            (fit, (target,)) if pair is None else (newton, tuple(x.squeeze() for x in pair))
        )
        if coin and options["update_preconditioner_first"]:
            refit(Q, L, *args, generator=gen)
        u = kron_precondition(Q, m, triangular=geometry == "EQ")
        if coin and not options["update_preconditioner_first"]:
            refit(Q, L, *args, generator=gen)
        u = clip_update(u, options["grad_clip_max_amps"])
        param.sub_(u.reshape(param.shape), alpha=lr)
        step_t += 1


# --------------------------------------------------------------------------------------------------
# factor layout
# --------------------------------------------------------------------------------------------------


def factor_kinds(
    shape: Sequence[int], max_size: float = math.inf, max_skew: float = 1.0
) -> list[bool]:
    """Which Kronecker factors are dense (``True``) and which are diagonal (``False``).

    Rule (official ``init_kron``): the gradient is squeezed first (size-1 dims dropped); a dim of
    size ``d`` of a tensor with ``numel`` entries gets a diagonal factor if ``d <= 1``,
    ``d > max_size`` or ``d**2 > max_skew * numel``, else a dense (triangular, for geometry
    ``"EQ"``) ``d x d`` factor.
    With the default ``max_skew = 1`` the larger side of a non-square matrix is diagonal (one-sided
    Kron) and a square matrix is two-sided; ``max_skew = inf`` makes every dim dense (kron-torch's
    ``memory_save_mode=None``), ``max_skew = 0`` every dim diagonal (``"all_diag"``). A scalar gets
    one scalar factor (returned as ``[False]``).

    Args:
        shape: the parameter's shape (squeezed here).
        max_size: largest dim that may be dense.
        max_skew: a dim is dense only if ``d**2 <= max_skew * numel``.

    Returns:
        one bool per squeezed dim (``[False]`` for a scalar).

    Example:
        >>> factor_kinds((512, 1024)), factor_kinds((64, 64)), factor_kinds((10,))
        ([True, False], [True, True], [False])
    """
    dims = [int(d) for d in shape if int(d) != 1]
    if not dims:
        return [False]
    numel = math.prod(dims)
    return [not (d <= 1 or d > max_size or d * d > max_skew * numel) for d in dims]


def init_factors(
    shape: Sequence[int],
    kinds: Sequence[bool],
    scale: float | Tensor,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Initial factors ``Q_i = scale**(1/k) I`` (dense) or ``scale**(1/k) 1`` (diagonal).

    With ``k`` squeezed dims, ``Q = Q_1 ⊗ ... ⊗ Q_k = scale * I`` and ``P = QᵀQ = scale² I``. A
    scalar gets ``[scale]``.

    Args:
        shape: the parameter's shape (squeezed here).
        kinds: :func:`factor_kinds` of that shape.
        scale: the initial scale of ``Q``.
        dtype, device: of the factors.

    Returns:
        the list of factors (2-D dense, 1-D diagonal, 0-D for a scalar).
    """
    dims = [int(d) for d in shape if int(d) != 1]
    if isinstance(scale, Tensor):  # a 0-d tensor (the automatic scale): never read on the host
        scale = scale.to(device)
    if not dims:
        return [torch.as_tensor(scale, dtype=dtype, device=device).clone()]
    s = scale ** (1.0 / len(dims))
    return [
        s * torch.eye(d, dtype=dtype, device=device)
        if dense
        else s * torch.ones(d, dtype=dtype, device=device)
        for d, dense in zip(dims, kinds)
    ]


# --------------------------------------------------------------------------------------------------
# mode-wise tensor algebra (matrices special-cased so that nothing is copied)
# --------------------------------------------------------------------------------------------------


_BLOCK = 256  # below this size a triangular or symmetric product is one plain matmul


def _triu_mm(U: Tensor, X: Tensor, trans: bool) -> Tensor:
    """``op(U) @ X`` for an upper-triangular ``U`` (``op``: transpose if ``trans``), skipping zeros.

    Recursive 2x2 blocking: ``[U11 U12; 0 U22] [X1; X2] = [U11 X1 + U12 X2; U22 X2]``, so about half
    the multiply-adds of a dense product for large ``U``. Exact zeros of ``U`` contribute nothing
    either way, so the result equals the dense product up to round-off.
    """
    out = torch.empty(U.shape[0], X.shape[1], dtype=X.dtype, device=X.device)
    _triu_mm_into(out, U, X, trans)
    return out


def _triu_mm_into(out: Tensor, U: Tensor, X: Tensor, trans: bool) -> None:
    n = U.shape[0]
    if n <= _BLOCK:
        torch.mm(U.mT if trans else U, X, out=out)
        return
    h = n // 2
    if trans:  # [U11ᵀ 0; U12ᵀ U22ᵀ]
        _triu_mm_into(out[:h], U[:h, :h], X[:h], True)
        _triu_mm_into(out[h:], U[h:, h:], X[h:], True)
        out[h:].addmm_(U[:h, h:].mT, X[:h])
    else:
        _triu_mm_into(out[:h], U[:h, :h], X[:h], False)
        out[:h].addmm_(U[:h, h:], X[h:])
        _triu_mm_into(out[h:], U[h:, h:], X[h:], False)


def _gram(X: Tensor) -> Tensor:
    """``X Xᵀ`` computing one triangle of blocks (symmetric; 2x2 recursive blocking)."""
    n = X.shape[0]
    if n <= _BLOCK:
        return X @ X.mT
    h = n // 2
    out = torch.empty(n, n, dtype=X.dtype, device=X.device)
    out[:h, :h] = _gram(X[:h])
    out[h:, h:] = _gram(X[h:])
    off = X[:h] @ X[h:].mT
    out[:h, h:] = off
    out[h:, :h] = off.mT
    return out


def _mode_apply(
    q: Tensor, x: Tensor, i: int, transpose: bool = False, triangular: bool = False
) -> Tensor:
    """Multiply mode ``i`` of ``x`` by ``q`` (or ``qᵀ``): ``y[..a..] = Σ_b q[a, b] x[..b..]``.

    A 1-D ``q`` is a diagonal (the transpose is the same). ``triangular=True`` declares ``q`` upper
    triangular (geometry ``"EQ"``) and uses :func:`_triu_mm` for the first and last modes.
    """
    if q.dim() < 2:
        if x.dim() == 0:
            return q * x
        shape = [1] * x.dim()
        shape[i] = -1
        return x * q.view(shape)
    m = q.mT if transpose else q
    n = x.dim()
    if i == 0:
        x2 = x.reshape(x.shape[0], -1)
        y = _triu_mm(q, x2, transpose) if triangular else m @ x2
        return y.view(x.shape)
    if i == n - 1:
        x2 = x.reshape(-1, x.shape[-1])
        y = _triu_mm(q, x2.mT, transpose).mT if triangular else x2 @ m.mT
        return y.reshape(x.shape)
    xt = x.movedim(i, -1)
    return (xt @ m.mT).movedim(-1, i)


def _mode_solve_t(q: Tensor, x: Tensor, i: int) -> Tensor:
    """Apply ``q^{-T}`` along mode ``i`` of ``x``; ``q`` upper triangular, diagonal or scalar."""
    if q.dim() < 2:
        if x.dim() == 0:
            return x / q
        shape = [1] * x.dim()
        shape[i] = -1
        return x / q.view(shape)
    q_wide = lift(q)
    # y_(i) = q^{-T} x_(i)  <=>  y_(i)ᵀ = x_(i)ᵀ q^{-1}: a right solve with the upper factor
    if x.dim() == 1:
        y = torch.linalg.solve_triangular(q_wide, lift(x)[None, :], upper=True, left=False)
        return y[0].to(x.dtype)
    xt = x.movedim(i, -1)
    y = torch.linalg.solve_triangular(q_wide, lift(xt), upper=True, left=False).to(x.dtype)
    return y.movedim(-1, i)


def _mode_gram(x: Tensor, i: int, dense: bool) -> Tensor:
    """Contract ``x`` with itself over every dim but ``i``: ``X_(i) X_(i)ᵀ`` or its diagonal."""
    n = x.dim()
    if n == 0:
        return x * x
    if not dense:
        dims = [j for j in range(n) if j != i]
        return (x * x).sum(dim=dims) if dims else x * x
    if i == 0:
        return _gram(x.reshape(x.shape[0], -1))
    if i == n - 1:
        return _gram(x.reshape(-1, x.shape[-1]).mT)
    return _gram(x.movedim(i, 0).reshape(x.shape[i], -1))


def kron_precondition(Q: Sequence[Tensor], g: Tensor, triangular: bool = False) -> Tensor:
    """``P g`` with ``P = QᵀQ``, ``Q = Q_1 ⊗ ... ⊗ Q_k`` applied mode-wise (``precond_grad_kron``).

    ``g`` is the squeezed gradient (``k`` dims); mode ``i`` is multiplied by ``Q_iᵀ Q_i`` (``q_i²``
    for a diagonal factor). ``triangular=True`` declares the dense factors upper triangular
    (geometry ``"EQ"``) and skips their zero halves; the result is the same up to round-off.

    Example:
        >>> Q = [2.0 * torch.eye(2), torch.tensor([1.0, 3.0])]
        >>> kron_precondition(Q, torch.ones(2, 2))
        tensor([[ 4., 36.],
                [ 4., 36.]])
    """
    if g.dim() == 0:
        return Q[0] * Q[0] * g
    x = g
    numel = g.numel()
    for i, q in enumerate(Q):
        if q.dim() < 2:
            x = _mode_apply(q * q, x, i)
        elif q.shape[0] ** 2 < numel:
            # forming P_i = Q_iᵀQ_i (d³) and applying it once (d²·n) beats two products (2d²·n)
            p = _triu_mm(q, q, True) if triangular else q.mT @ q
            x = _mode_apply(p, x, i)
        else:
            x = _mode_apply(q, _mode_apply(q, x, i, False, triangular), i, True, triangular)
    return x


# --------------------------------------------------------------------------------------------------
# the official helpers: spectral-norm lower bounds, Procrustes rotation, factor balancing
# --------------------------------------------------------------------------------------------------


def _subspace_bound(A: Tensor, scale: Tensor, generator: torch.Generator | None) -> Tensor:
    tiny = torch.finfo(A.dtype).smallest_normal
    A = A / scale
    j = torch.argmax(torch.linalg.vector_norm(A, dim=1))
    V = torch.randn(_NORM_BOUND_K, A.shape[1], dtype=A.dtype, device=A.device, generator=generator)
    row = A.index_select(0, j.reshape(1)).squeeze(0)  # A[j] would read j back to the host
    V = row + torch.sign(torch.sum(row * V, dim=1, keepdim=True)) * V
    for _ in range(2):
        V = V @ A
        V = V / (torch.linalg.vector_norm(V, dim=1, keepdim=True) + tiny)
        V = V @ A
    return scale * torch.amax(torch.linalg.vector_norm(V, dim=1))


def norm_lower_bound_spd(A: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Cheap lower bound of ``‖A‖₂`` for a symmetric PSD ``A`` (official ``norm_lower_bound_spd``).

    ``A`` is scaled by its largest diagonal entry; 32 random vectors ``V`` are shifted towards the
    largest row of ``A`` (sign-aligned), then two "half" subspace iterations ``V ← normalise(V A)
    A`` give ``max_row ‖V‖`` times the scale. Never above ``‖A‖₂`` (up to round-off).

    Args:
        A: ``[d, d]`` symmetric PSD.
        generator: source of the 32 ``d``-dim normal probes.

    Returns:
        a 0-d tensor.
    """
    scale = A.diagonal().amax() + torch.finfo(A.dtype).smallest_normal
    return _subspace_bound(A, scale, generator)


def norm_lower_bound_skew(A: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Cheap lower bound of ``‖A‖₂`` for a skew-symmetric ``A`` (official ``norm_lower_bound_skh``).

    As :func:`norm_lower_bound_spd`, scaled by ``max |A_ij|`` instead of the largest diagonal entry.
    """
    scale = A.abs().amax() + torch.finfo(A.dtype).smallest_normal
    return _subspace_bound(A, scale, generator)


def procrustes_step(q: Tensor, generator: torch.Generator | None = None) -> None:
    """One online orthogonal-Procrustes rotation ``Q ← exp(aR) Q`` pulling ``Q`` towards SPD.

    In place. Official ``procrustes_step2`` (max step 1/8): ``R = Qᵀ - Q`` normalised by a lower
    bound of its norm, ``exp(aR) ≈ I + aR + (aR)²/2``; ``a = min(-tr(RQ)/tr(R²Q), 1/8)`` if
    ``tr(R²Q) < 0``, else 1/8.
    """
    R = q.mT - q
    R = R / (norm_lower_bound_skew(R, generator) + torch.finfo(R.dtype).smallest_normal)
    RQ = R @ q
    RRQ = R @ RQ
    tr_rq = RQ.diagonal().sum()
    tr_rrq = RRQ.diagonal().sum()
    a = torch.where(tr_rrq < 0, torch.clamp(-tr_rq / tr_rrq, max=0.125), 0.125)
    q.add_(a * (RQ + 0.5 * a * RRQ))


def balance_factors(Q: Sequence[Tensor]) -> None:
    """Rescale the factors to the geometric mean of their max-magnitudes, in place; ``Q`` unchanged.

    Official ``balance_kron_precond``: with ``n_i = max |Q_i|`` and ``m = (Π n_i)^(1/k)``, ``Q_i ←
    Q_i m/n_i``.
    """
    if len(Q) < 2:
        return
    norms = [q.abs().amax() for q in Q]
    gmean = torch.prod(torch.stack(norms)) ** (1.0 / len(Q))
    for q, n in zip(Q, norms):
        q.mul_(gmean / n)


# --------------------------------------------------------------------------------------------------
# preconditioner fitting (single tensor; the reference)
# --------------------------------------------------------------------------------------------------


def _maybe_balance(Q: Sequence[Tensor], generator: torch.Generator | None) -> None:
    if host_uniform(generator) < _BALANCE_PROB:
        balance_factors(Q)


def update_precond_kron_eq(
    Q: Sequence[Tensor],
    L: Sequence[Tensor],
    v: Tensor,
    h: Tensor,
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
    generator: torch.Generator | None = None,
) -> None:
    """Fit ``Q`` on the group of triangular (or diagonal) matrices with the pair ``(v, h)``.

    In place. Criterion (Li, 2018/2024): ``E[hᵀ P h + vᵀ P⁻¹ v]``, minimised by
    ``P = (E[h hᵀ])^{-1/2}`` for the whitening pair and by ``|H|⁻¹`` for ``h = H v``. With
    ``A = Q h`` and ``B = Q^{-T} v`` (mode-wise: ``Q_i`` and triangular solves with ``Q_iᵀ``), the
    gradient on the group along factor ``i`` is ``E_i = A_(i)A_(i)ᵀ - B_(i)B_(i)ᵀ`` (its diagonal
    for a diagonal factor). Step ``dQ = E Q``:

        ℓ_i = lower bound of ‖A_(i)A_(i)ᵀ + B_(i)B_(i)ᵀ‖₂     (diagonal factor: max entry)
        L_i ← max(β L_i + (1-β) ℓ_i, ℓ_i)
        Q_i ← Q_i - (lr / L_i) triu(E_i) Q_i                   (diagonal: Q_i - (lr/L_i) E_i ⊙ Q_i)

    then, with probability 0.01 (a draw from ``generator``), :func:`balance_factors`.
    Random draws, in the official order: 32 probes per dense factor, then the balancing coin.

    Args:
        Q: the factors (updated in place).
        L: one 0-d Lipschitz estimate per factor (updated in place).
        v, h: squeezed tensors of the parameter's shape.
        lr: preconditioner step size (official ``lr_preconditioner``).
        beta_lipschitz: EMA factor of the Lipschitz estimate (official ``betaL``).
        generator: source of the probes and the balancing coin.
    """
    k = h.dim()
    A = h
    for i, q in enumerate(Q):
        A = _mode_apply(q, A, i, triangular=True)
    B = v
    for i, q in enumerate(Q):
        B = _mode_solve_t(q, B, i)
    for i, q in enumerate(Q):
        dense = q.dim() == 2
        t1 = _mode_gram(A, i, dense) if k else A * A
        t2 = _mode_gram(B, i, dense) if k else B * B
        if dense:
            ell = norm_lower_bound_spd(t1 + t2, generator)
            Li = update_lipschitz(L[i], ell, beta_lipschitz)
            q.sub_(_triu_mm((lr / Li).to(q.dtype) * torch.triu(t1 - t2), q, False))
        else:
            ell = torch.max(t1 + t2)
            Li = update_lipschitz(L[i], ell, beta_lipschitz)
            q.sub_((lr / Li).to(q.dtype) * (t1 - t2) * q)
    _maybe_balance(Q, generator)


def update_precond_kron_whiten(
    Q: Sequence[Tensor],
    L: Sequence[Tensor],
    g: Tensor,
    *,
    geometry: str = "EQ",
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    generator: torch.Generator | None = None,
) -> None:
    """Whitening fit of the Kron factors ``Q`` on the gradient ``g``, in place.

    Draws ``v ~ N(0, I)`` (first draw from ``generator``) and sets ``h = g + (damping + ε|g|) ⊙ v``
    with ``ε`` the dtype's machine epsilon; the fixed point is ``P = QᵀQ ≈ E[h hᵀ]^{-1/2}``
    (Kronecker-structured), which whitens the gradient.

    ``geometry="EQ"`` (official ``update_precond_kron_whiten_eq``): :func:`update_precond_kron_eq`
    with ``(v, h)``. ``geometry="Q0.5EQ1.5"`` (official ``update_precond_kron_whiten_q0p5eq1p5``,
    the official default): with ``Pg = P h`` and, per factor, ``c_i = numel / d_i``::

        T_i = Pg_(i) Pg_(i)ᵀ (diagonal: row sums of squares);  ℓ_i = ‖T_i‖₂-lower-bound + c_i
        L_i ← max(β L_i + (1-β) ℓ_i, ℓ_i)
        Q_i ← Q_i - (lr/L_i)(T_i Q_i - c_i Q_i), then :func:`procrustes_step`
        (diagonal: Q_i ← Q_i ⊙ (1 - (lr/L_i)(T_i - c_i)))

    then the 0.01 balancing coin. Draws: ``v``; per dense factor 32 probes (norm bound) and 32
    (rotation).
    """
    v, h = whitening_probe(g, damping, generator)
    if geometry == "EQ":
        update_precond_kron_eq(Q, L, v, h, lr, beta_lipschitz, generator)
        return
    _update_q0p5eq1p5(Q, L, None, h, lr, beta_lipschitz, generator)


def _update_q0p5eq1p5(
    Q: Sequence[Tensor],
    L: Sequence[Tensor],
    v: Tensor | None,
    h: Tensor,
    lr: float,
    beta_lipschitz: float,
    generator: torch.Generator | None,
) -> None:
    """The ``dQ = Q^0.5 E Q^1.5`` step on ``(v, h)``; ``v = None`` integrates the whitening
    probe out (``V_(i)V_(i)ᵀ`` replaced by its mean ``c_i I``, official whitening rule)."""
    pg = kron_precondition(Q, h)
    numel = h.numel()
    k = h.dim()
    for i, q in enumerate(Q):
        dense = q.dim() == 2
        t1 = _mode_gram(pg, i, dense) if k else pg * pg
        if v is None:
            t2: Tensor | float = numel / q.numel() if not dense else numel / q.shape[0]
        else:
            t2 = _mode_gram(v, i, dense) if k else v * v
        if dense:
            ell = norm_lower_bound_spd(t1 if v is None else t1 + t2, generator)  # type: ignore[operator]
            Li = update_lipschitz(L[i], ell + t2 if v is None else ell, beta_lipschitz)
            q.sub_((lr / Li).to(q.dtype) * (t1 @ q - t2 * q if v is None else (t1 - t2) @ q))
            procrustes_step(q, generator)
        else:
            ell = torch.max(t1 + t2)
            Li = update_lipschitz(L[i], ell, beta_lipschitz)
            q.mul_(1 - (lr / Li).to(q.dtype) * (t1 - t2))
    _maybe_balance(Q, generator)


def update_precond_kron_newton(
    Q: Sequence[Tensor],
    L: Sequence[Tensor],
    v: Tensor,
    h: Tensor,
    *,
    geometry: str = "EQ",
    lr: float = 0.1,
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    generator: torch.Generator | None = None,
) -> None:
    """Newton-type fit of the Kron factors ``Q`` on a pair ``(v, h = H v)``, in place.

    Official ``update_precond_kron_newton_eq`` / ``_q0p5eq1p5``: ``h ← h + (damping + ε|h|) ⊙ n``
    with ``n ~ N(0, I)`` (first draw from ``generator``; bounds ``P < I/damping``), then the
    criterion ``E[hᵀPh + vᵀP⁻¹v]``, minimised by ``P = |H|⁻¹`` (Li 2018): ``"EQ"``:
    :func:`update_precond_kron_eq`; ``"Q0.5EQ1.5"``: with ``Ph = P h``, per factor
    ``T_i = Ph_(i)Ph_(i)ᵀ - V_(i)V_(i)ᵀ``, ``ℓ_i`` the norm bound of ``Ph_(i)Ph_(i)ᵀ + V_(i)V_(i)ᵀ``,
    ``Q_i ← Q_i - (lr/L_i) T_i Q_i`` then :func:`procrustes_step` (diagonal:
    ``Q_i ← Q_i ⊙ (1 - (lr/L_i) T_i)``); then the 0.01 balancing coin.

    Args:
        Q, L: the factors and their Lipschitz estimates (updated in place).
        v, h: the probe and its Hessian-vector product, squeezed to the parameter's dims.
        geometry, lr, beta_lipschitz, damping: as :func:`update_precond_kron_whiten`.
        generator: source of the damping noise, the norm-bound probes and the coins.
    """
    h = pair_damped(h, damping, generator)
    if geometry == "EQ":
        update_precond_kron_eq(Q, L, v, h, lr, beta_lipschitz, generator)
    else:
        _update_q0p5eq1p5(Q, L, v, h, lr, beta_lipschitz, generator)


# --------------------------------------------------------------------------------------------------
# state layout
# --------------------------------------------------------------------------------------------------


def _num_factors(shape: Sequence[int]) -> int:
    return max(1, sum(1 for d in shape if d != 1))


def _check_param_state(pid: Any, p: Tensor, st: Mapping[str, Any]) -> None:
    """The factor keys and shapes of one parameter's saved state."""
    k = _num_factors(p.shape)
    allowed = {*_STATE_KEYS} | {f"Q_{i}" for i in range(k)} | {f"L_{i}" for i in range(k)}
    extra = sorted(set(st) - allowed)
    if extra:
        raise StateDictError(
            f"state of parameter id {pid!r} has keys {extra} that PSGDKron does not use for a "
            f"parameter of shape {tuple(p.shape)}: the state_dict was saved from another "
            "optimizer, or for a model whose parameters have another shape"
        )
    dims = [d for d in p.shape if d != 1] or [1]
    for i, d in enumerate(dims):
        q = st.get(f"Q_{i}")
        if q is None:
            raise StateDictError(
                f"state of parameter id {pid!r} lacks the factor 'Q_{i}': it was saved from "
                "another optimizer"
            )
        if (q.shape[0] if q.dim() else 1) != d:
            raise StateDictError(
                f"factor Q_{i} of parameter id {pid!r} has shape {tuple(q.shape)}, which does "
                f"not fit the parameter's shape {tuple(p.shape)}; the state_dict was saved "
                "for a different model"
            )
