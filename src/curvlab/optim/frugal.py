"""FRUGAL: gradient splitting into a state-full subspace (AdamW) and a state-free rest (signSGD).

Zmushko, Beznosikov, Takáč, Horváth 2024, "FRUGAL: Memory-Efficient Optimization by Reducing State
Overhead for Scalable Training", arXiv 2411.07837 (ICML 2025). Authors' code ("Supplementary
code", commits by fzmushko of 2024-11-13: ``frugal/proj_optimizer_templates.py`` classes
``BlockOptimizer``, ``CoordOptimizer``; ``frugal/adamw.py`` class ``AdamW``), read through a
public fork.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.errors import ParameterError, StateDictError
from curvlab.optim._dispatch import KernelChoice, split_choice
from curvlab.optim._fused import accumulate_dtype, fused_foreach, validate_fused
from curvlab.optim._scratch import workspace
from curvlab.optim._validation import (
    add_param_group_checked,
    group_options,
    group_step,
    load_state_dict_checked,
    start_step,
    validate_choice,
    validate_in_range,
    validate_int,
    validate_nonnegative,
    validate_standard,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "BLOCK_ORDERS",
    "FRUGAL",
    "FRUGALHyper",
    "FRUGALOptions",
    "INACTIVE_UPDATE_RULES",
    "PROJECTIONS",
    "block_selection",
    "frugal",
]

#: ``"blocks"``: whole tensors (BAdam-like; the paper's main pre-training runs, ``--optimizer
#: frugal``); ``"columns"`` / ``"rows"``: a random ``density`` fraction of the columns / rows of
#: every tensor.
PROJECTIONS: tuple[str, ...] = ("blocks", "columns", "rows")
#: Order in which blocks become state-full at each refresh (official ``block_order``).
BLOCK_ORDERS: tuple[str, ...] = ("random", "ascending", "descending", "mirror")
#: Update of the state-free part (official ``inactive_update_rule``).
INACTIVE_UPDATE_RULES: tuple[str, ...] = ("sign_sgd", "sgd", "no")

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
#: (target tensor, gradient, exp_avg, exp_avg_sq, step size, sqrt of bias correction 2)
_AdamEntry = tuple[Tensor, Tensor, Tensor, Tensor, float, float]
_MIX = 0x9E3779B97F4A7C15
#: CPU, foreach=None: tensors with at least this many entries use the loop with a scratch buffer.
_SCRATCH_NUMEL = 1 << 18


class FRUGALHyper(TypedDict):
    """The hyper-parameters of one FRUGAL step, as in the param groups (see :class:`FRUGAL`)."""

    lr: float | Tensor
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    projection: str
    reset_statistics: bool
    inactive_update_rule: str
    inactive_lr_scale: float
    proj_params_lr_scale: float


class FRUGALOptions(FRUGALHyper, KernelChoice):
    """The keyword arguments of :func:`frugal` besides ``steps_since_refresh``: the
    hyper-parameters and the path."""


class FRUGAL(Optimizer):
    r"""FRUGAL: AdamW on a state-full subspace, signSGD (state-free) on the rest of the gradient.

    For the *split* parameters of a group (by default its tensors with ≥ 2 dimensions, i.e. the
    Linear/conv weights; ``split=False`` for a group keeps it plain AdamW, as the official code does
    for embeddings, norms, biases and the output layer)::

        every T = update_gap steps (t = 0, T, 2T, ...): choose the subspace S_k (k = t // T) and
            reset the AdamW moments of the split tensors (fresh zeros; Adam's step restarts at 0)
        θ ← θ · (1 − lr · wd)                                              (decoupled, all params)
        on S_k:  m ← β1 m + (1 − β1) g_S ;  v ← β2 v + (1 − β2) g_S²
                 θ_S ← θ_S − lr·s · (m / (1 − β1^t)) / (sqrt(v) / sqrt(1 − β2^t) + eps)
        on the rest (state-free):  θ_R ← θ_R − lr·s·s_free · sign(g_R)   ("sign_sgd"; "sgd": g_R)
        non-split params: plain AdamW with lr
        (s = proj_params_lr_scale, s_free = inactive_lr_scale)

    Subspaces (``projection``): ``"blocks"`` (default; the paper's main pre-training
    configuration, the official ``BlockAdamW`` / ``--optimizer frugal``): ``round(density · n)``
    of the group's ``n`` split tensors are state-full, in ``block_order``; ``"columns"`` /
    ``"rows"`` (official ``CoordAdamW`` with ``coord_choice``): ``int(density · c)`` random
    columns (rows) of every split tensor, moments stored only for them. The GaLore-style SVD
    projection of the paper is not implemented. ``reset_statistics=False`` keeps the moments
    across refreshes (column/row projections only; blocks always restart, as in the official
    code).

    Memory (float32): 8 bytes per state-full entry, none for the state-free part: ``8 · density``
    bytes per split parameter for ``"columns"``/``"rows"`` (2 B at ``density = 0.25``) and for
    ``"blocks"`` when the split tensors have equal sizes (transformer blocks; in general it is 8 ×
    the chosen tensors' share), 8 bytes per non-split parameter.

    Randomness and resume: subspace ``k`` is a function of ``(seed, k)`` only (a ``torch.Generator``
    seeded from them), so the state holds only moments and integer counters and a resumed run is
    bit-identical. Deviations from the official code: that seeding (official: the global
    generator); the refresh clock is one per group (official: the first parameter's own step
    counter; here the largest step count of the group's parameters); the chosen columns/rows are sorted; moments are created lazily, only for parameters
    that receive a gradient.

    Args:
        params: parameters or param groups; a group may set ``split`` (``None``: tensors with
            ``dim ≥ 2``; ``True``: all; ``False``: none) and any hyper-parameter below.
        lr: learning rate (default ``1e-3``); the others are keyword-only.
        density: ρ, the state-full fraction (default ``0.25``).
        update_gap: T, steps between subspace refreshes (default ``200``).
        projection: ``"blocks"`` | ``"columns"`` | ``"rows"`` (default ``"blocks"``).
        block_order: ``"random"`` | ``"ascending"`` | ``"descending"`` | ``"mirror"`` (default
            ``"random"``, the official default; the paper's C4 scripts use ``"descending"``).
        inactive_update_rule: ``"sign_sgd"`` | ``"sgd"`` | ``"no"`` (default ``"sign_sgd"``).
        inactive_lr_scale: s_free (default ``1.0``; the authors use 0.1 for fine-tuning).
        proj_params_lr_scale: s, scales both updates of split parameters (default ``1.0``).
        reset_statistics: reset moments at refresh for column/row projections (default ``True``).
        split: default of the per-group ``split`` (default ``None``).
        seed: seed of the subspace choices (default ``0``).
        betas: AdamW ``(β1, β2)`` (default ``(0.9, 0.999)``).
        eps: AdamW denominator guard (default ``1e-8``).
        weight_decay: decoupled weight decay, applied to all parameters (default ``0.01``, the
            authors' AdamW default).
        foreach: use the ``torch._foreach_*`` path (default ``None``: on CPU, tensors of at least
            2**18 entries take the loop through one reusable scratch buffer, the others the
            foreach kernels); bitwise equal to the loop.
        fused: run the AdamW part and the whole state-free tensors as ``torch.compile``'d
            kernels, one call per bucket of tensors, weight decay included (default ``None`` =
            ``False``; the first step compiles for ~10-30 s, see :mod:`curvlab.optim._fused`);
            equal to the loop within float round-off. Column/row projections keep the loop for the
            gather/scatter.
        on_nonfinite: ``"raise"`` | ``"skip"`` | ``"ignore"``, see ``curvlab.optim._validation``.

    State (per parameter with a gradient): ``"step"`` (float32 scalar, completed steps); for the
    state-full part ``"exp_avg"`` and ``"exp_avg_sq"`` (the parameter's shape, or its chosen
    columns/rows). The group's refresh clock is the largest ``"step"`` of its parameters; Adam's
    bias correction restarts with the moments: it counts ``min(step, steps since the refresh) + 1``.

    Raises:
        ParameterError: an invalid hyper-parameter (the message names it and the valid values).
        NonFiniteError: a NaN/inf gradient under ``on_nonfinite="raise"``; nothing is changed.
        StateDictError: ``load_state_dict`` with another optimizer's state or other shapes.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
        >>> opt = FRUGAL(model.parameters(), lr=1e-2, density=0.25, update_gap=10)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step()
        >>> sum("exp_avg" in opt.state[m.weight] for m in model)   # one of four weights state-full
        1

    Paper: Zmushko, Beznosikov, Takáč, Horváth 2024, "FRUGAL: Memory-Efficient Optimization by
    Reducing State Overhead for Scalable Training", arXiv 2411.07837.
    """

    closure_mode: ClassVar[str] = "backward"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        *,
        density: float = 0.25,
        update_gap: int = 200,
        projection: str = "blocks",
        block_order: str = "random",
        inactive_update_rule: str = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        proj_params_lr_scale: float = 1.0,
        reset_statistics: bool = True,
        split: bool | None = None,
        seed: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        foreach: bool | None = None,
        fused: bool | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        validate_fused(fused, foreach)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "density": density,
            "update_gap": update_gap,
            "projection": projection,
            "block_order": block_order,
            "inactive_update_rule": inactive_update_rule,
            "inactive_lr_scale": inactive_lr_scale,
            "proj_params_lr_scale": proj_params_lr_scale,
            "reset_statistics": reset_statistics,
            "split": split,
            "seed": seed,
            "foreach": foreach,
            "fused": fused,
            "on_nonfinite": on_nonfinite,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyper-parameters are validated like the constructor's."""
        add_param_group_checked(self, param_group, _validate_group)

    # ------------------------------------------------------------------ helpers
    def _selection(
        self, gi: int, group: Mapping[str, Any], refresh: int
    ) -> dict[int, Tensor | None]:
        """Map ``id(p)`` of each state-full split tensor to its column/row indices (None: whole)."""
        cache: dict[int, tuple[tuple[Any, ...], dict[int, Tensor | None]]]
        cache = self.__dict__.setdefault("_subspace_cache", {})
        split = _split_params(group)
        key = (
            refresh,
            group["projection"],
            group["block_order"],
            group["density"],
            group["seed"],
            tuple(id(p) for p in split),
        )
        hit = cache.get(gi)
        if hit is not None and hit[0] == key:
            return hit[1]
        sel: dict[int, Tensor | None] = {}
        if group["projection"] == "blocks":
            for i in block_selection(
                len(split), group["density"], group["block_order"], group["seed"], refresh
            ):
                sel[id(split[i])] = None
        else:
            gen = _subspace_generator(group["seed"], refresh)
            axis = 1 if group["projection"] == "columns" else 0
            for p in split:
                n = _matrix_shape(p)[axis]
                idx = torch.randperm(n, generator=gen)[: int(n * group["density"])]
                sel[id(p)] = torch.sort(idx).values.to(p.device)
        cache[gi] = (key, sel)
        return sel

    def _init_group(self, gi: int, group: dict[str, Any], *lists: list[Any]) -> int:
        """Create, reset (at a refresh) and list the state; return the steps since the refresh.

        Appends every parameter with a gradient to ``lists = (params, grads, exp_avgs,
        exp_avg_sqs, state_steps, indices, splits)``: its ``exp_avg``/``exp_avg_sq`` (``None`` for a
        state-free split tensor), the chosen column/row ``indices`` (``None``: whole tensor) and
        whether it is split.
        """
        t = group_step(self, group)
        gap = int(group["update_gap"])
        if t % gap == 0 and _resets(group):
            for p in _split_params(group):
                st = self.state.get(p)
                if st:
                    st.pop("exp_avg", None)
                    st.pop("exp_avg_sq", None)
        sel = self._selection(gi, group, t // gap)
        axis = 1 if group["projection"] == "columns" else 0
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
            is_split = _is_split(group, p)
            idx = sel.get(id(p)) if is_split else None
            if is_split and id(p) not in sel:
                m = v = None
            else:
                if "exp_avg" not in st:
                    like = p if idx is None else _gather(p, idx, axis)
                    st["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
                m, v = st["exp_avg"], st["exp_avg_sq"]
            for lst, entry in zip(lists, (p, p.grad, m, v, st["step"], idx, is_split)):
                lst.append(entry)
        return t % gap

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state_dict saved by :class:`FRUGAL` on parameters of the same shapes.

        Raises:
            StateDictError: the state_dict comes from another optimizer or another model.
        """
        load_state_dict_checked(
            self,
            state_dict,
            state_keys=_STATE_KEYS,
            free_shape_keys=_MOMENT_KEYS,
            check_shapes=self._check_moment_shapes,
        )

    def _check_moment_shapes(self, state_dict: Mapping[str, Any]) -> None:
        """The moments have the parameter's shape, or that of its chosen columns/rows."""
        for sg, g in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                st = state_dict["state"].get(pid, {})
                allowed = {tuple(p.shape)}
                if _is_split(sg, p) and sg["projection"] != "blocks":
                    r, c = _matrix_shape(p)
                    if sg["projection"] == "columns":
                        allowed.add((r, int(c * sg["density"])))
                    else:
                        allowed.add((int(r * sg["density"]), c))
                for key in _MOMENT_KEYS:
                    v = st.get(key)
                    if isinstance(v, Tensor) and tuple(v.shape) not in allowed:
                        raise StateDictError(
                            f"state {key!r} of a parameter of shape {tuple(p.shape)} has shape "
                            f"{tuple(v.shape)}; the state_dict was saved for a model with "
                            "different parameter shapes (or another projection/density)"
                        )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One FRUGAL step; ``closure`` (optional) zeroes grads, calls backward, returns loss."""
        loss, proceed = start_step(self, closure)
        if not proceed:
            return loss
        for gi, group in enumerate(self.param_groups):
            lists: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
            since = self._init_group(gi, group, *lists)
            if lists[0]:
                hyper: FRUGALHyper = group_options(group, FRUGALHyper)
                frugal(*lists, foreach=group["foreach"], fused=group.get("fused"),
                       steps_since_refresh=since, scratch=self, **hyper)  # fmt: skip
        return loss


def frugal(*lists: list[Any], steps_since_refresh: int, **options: Unpack[FRUGALOptions]) -> None:
    """Functional API that performs the FRUGAL computation; see :class:`FRUGAL`.

    ``lists``: ``params, grads, exp_avgs, exp_avg_sqs, state_steps, indices, splits``, equally
    long. Per parameter: ``exp_avgs[i]``/``exp_avg_sqs[i]`` are ``None`` for a state-free split tensor;
    ``indices[i]`` are its chosen columns or rows (``projection``), or ``None`` for the whole
    tensor; ``splits[i]`` says whether it is split. Adam's step count is
    ``min(step, steps_since_refresh) + 1`` for split tensors whose moments restart at refreshes,
    else ``step + 1``. ``foreach=False`` selects :func:`_single_tensor_frugal`, else
    :func:`_multi_tensor_frugal` (``None``: large CPU tensors take the loop with a reusable
    buffer from ``scratch``, the owner of :mod:`._scratch` buffers); ``fused=True`` selects
    :func:`_fused_frugal`. ``options``: the :class:`FRUGALHyper` and the path
    (:class:`~curvlab.optim._dispatch.KernelChoice`).
    """
    choice, hyper = split_choice(options)
    foreach, scratch = choice.get("foreach"), choice.get("scratch")
    on_cpu = any(p.device.type == "cpu" for p in lists[0])
    if choice.get("fused"):
        _fused_frugal(*lists, since=steps_since_refresh, scratch=scratch, **hyper)
    elif foreach is False:
        _single_tensor_frugal(*lists, since=steps_since_refresh, scratch=scratch, **hyper)
    else:
        loop_large = foreach is None and on_cpu
        _multi_tensor_frugal(
            *lists, since=steps_since_refresh, scratch=scratch, loop_large=loop_large, **hyper
        )


def _single_tensor_frugal(
    *lists: list[Any], since: int, scratch: object | None, **hyper: Unpack[FRUGALHyper]
) -> None:
    """The FRUGAL rule one tensor at a time (the reference): every tensor takes the loop."""
    _frugal_update(*lists, since=since, scratch=scratch, big=lambda t: True, **hyper)


def _multi_tensor_frugal(
    *lists: list[Any],
    since: int,
    scratch: object | None,
    loop_large: bool,
    **hyper: Unpack[FRUGALHyper],
) -> None:
    """The FRUGAL rule with ``torch._foreach_*`` kernels; bitwise equal to the loop.

    With ``loop_large`` (CPU, ``foreach=None``), tensors of at least ``2**18`` entries take the
    loop through the scratch buffer instead (a fresh multi-MB temporary per tensor and step costs
    page faults); both run the same operations.
    """
    big = (lambda t: t.numel() >= _SCRATCH_NUMEL) if loop_large else (lambda t: False)
    _frugal_update(*lists, since=since, scratch=scratch, big=big, **hyper)


def _fused_frugal(
    *lists: list[Any], since: int, scratch: object | None, **hyper: Unpack[FRUGALHyper]
) -> None:
    """The FRUGAL rule with compiled kernels (:mod:`._fused`): whole-tensor AdamW entries and
    whole state-free tensors take one kernel call per bucket (weight decay folded in), the column/row
    projections the loop of :func:`_single_tensor_frugal` with a compiled AdamW on the gathered
    part. Equal to :func:`_single_tensor_frugal` within round-off."""
    _frugal_update(*lists, since=since, scratch=scratch, big=lambda t: True, fused=True, **hyper)


def _frugal_update(
    *lists: list[Any],
    since: int,
    scratch: object | None,
    big: Callable[[Tensor], bool],
    fused: bool = False,
    **hyper: Unpack[FRUGALHyper],
) -> None:
    """The FRUGAL update; tensors with ``big(t)`` take the per-tensor loop, the others foreach
    (``fused``: see :func:`_fused_frugal`)."""
    params, grads, exp_avgs, exp_avg_sqs, state_steps, indices, splits = lists
    lr, (beta1, beta2), eps = float(hyper["lr"]), hyper["betas"], float(hyper["eps"])
    weight_decay, rule = float(hyper["weight_decay"]), hyper["inactive_update_rule"]
    reset_moments = _resets(hyper)
    axis = 1 if hyper["projection"] == "columns" else 0
    lr_split = lr * float(hyper["proj_params_lr_scale"])
    lr_free = lr_split * float(hyper["inactive_lr_scale"])
    adam: list[_AdamEntry] = []
    # (param, grad, indices, exp_avg, exp_avg_sq, step size, bc2) of column/row projections
    coord: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float, float]] = []
    free: list[tuple[Tensor, Tensor]] = []
    for p, g, m, v, step_t, idx, is_split in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, indices, splits
    ):
        if m is None or v is None:
            free.append((p, g))
            continue
        step = int(step_t)
        n = (min(step, since) if is_split and reset_moments else step) + 1
        step_size = (lr_split if is_split else lr) / (1.0 - beta1**n)
        bc2_sqrt = math.sqrt(1.0 - beta2**n)
        if idx is None:
            adam.append((p, g, m, v, step_size, bc2_sqrt))
        else:
            gd = _gather(g, idx, axis)
            coord.append((p, gd, idx, m, v, step_size, bc2_sqrt))
    torch._foreach_add_(state_steps, torch.tensor(1.0), alpha=1.0)
    ws = functools.partial(workspace, scratch) if scratch is not None else torch.empty_like
    decay = 1.0 - lr * weight_decay
    # fused: the kernels of whole AdamW and whole state-free tensors apply the decay themselves
    folded = {id(t) for t, *_ in adam + (free if rule != "no" else [])} if fused else set()
    if weight_decay != 0.0:
        small = [p for p in params if not big(p)]
        if small:
            torch._foreach_mul_(small, decay)
        for p in params:
            if big(p) and id(p) not in folded:
                p.mul_(decay)
    # whole tensors (non-split and state-full blocks): AdamW in place.
    if fused:
        _fused_adam(adam, beta1, beta2, eps, decay)
    _adam_update([e for e in adam if not big(e[0])], beta1, beta2, eps, True)
    _adam_update([e for e in adam if big(e[0]) and not fused], beta1, beta2, eps, False, ws)
    # column/row projections: θ_S is gathered (after weight decay) and updated by Adam; the
    # state-free rule is applied to the whole tensor, then θ_S is written back, so the chosen
    # part gets exactly θ_S + Adam update (its residual g − P(Pᵀg) is 0) and the rest the rule.
    views, gathered, entries = [], [], []
    for p, gd, idx, m, v, step_size, bc2_sqrt in coord:
        shape = _matrix_shape(p)
        pm = p.view(shape) if p.is_contiguous() else p.reshape(shape).clone()
        pd = pm.index_select(axis, idx)
        views.append(pm)
        gathered.append(pd)
        entries.append((pd, gd, m, v, step_size, bc2_sqrt))
    if fused:
        _fused_adam(entries, beta1, beta2, eps, 1.0)
    _adam_update([e for e in entries if not big(e[1])], beta1, beta2, eps, True)
    _adam_update([e for e in entries if big(e[1]) and not fused], beta1, beta2, eps, False, ws)
    for (p, _gd, idx, *_), pm, pd in zip(coord, views, gathered):
        if rule != "no":
            assert p.grad is not None
            pm.add_(_free_direction(p.grad.reshape(pm.shape), rule, ws), alpha=-lr_free)
        pm.index_copy_(axis, idx, pd)
        if not p.is_contiguous():
            p.copy_(pm.view_as(p))
    # whole state-free tensors: signSGD (or SGD).
    if rule == "no" or not free:
        return
    if fused:
        sign = rule == "sign_sgd"
        fused_foreach(_free_kernel, [((p, g), (decay, lr_free, sign)) for p, g in free])
        return
    small_free = [(p, g) for p, g in free if not big(g)]
    if small_free:
        ps, gs = [p for p, _ in small_free], [g for _, g in small_free]
        if rule == "sign_sgd":
            gs = list(torch._foreach_sign(gs))
        torch._foreach_add_(ps, gs, alpha=-lr_free)
    for p, g in free:
        if big(g):
            p.add_(_free_direction(g, rule, ws), alpha=-lr_free)


def _free_direction(g: Tensor, rule: str, ws: Callable[[Tensor], Tensor]) -> Tensor:
    """``sign(g)`` (``"sign_sgd"``) or ``g`` (``"sgd"``), written into the buffer ``ws(g)``."""
    d = ws(g)
    return torch.sign(g, out=d) if rule == "sign_sgd" else d.copy_(g)


def _fused_adam(
    entries: list[_AdamEntry], beta1: float, beta2: float, eps: float, decay: float
) -> None:
    """:func:`_adam_update` as one compiled call per bucket of entries
    (:func:`._fused.fused_foreach`), ``target`` first scaled by ``decay`` (the folded weight decay;
    1 for gathered column/row targets)."""
    rows = [
        ((target, g, m, v), (step_size, bc2_sqrt, beta1, beta2, eps, decay))
        for target, g, m, v, step_size, bc2_sqrt in entries
    ]
    fused_foreach(_adam_kernel, rows)


def _adam_kernel(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], step_size: float,
    bc2_sqrt: float, beta1: float, beta2: float, eps: float, decay: float,
) -> None:  # fmt: skip
    """One AdamW update of :func:`_adam_update` on each tensor, written for one pass."""
    for p, g, m, v in zip(ps, gs, ms, vs):
        acc = accumulate_dtype(p)
        g32 = g.to(acc)
        m32 = m.to(acc) + (1.0 - beta1) * (g32 - m.to(acc))
        v32 = v.to(acc) * beta2 + (1.0 - beta2) * g32 * g32
        m.copy_(m32)
        v.copy_(v32)
        p.copy_(p.to(acc) * decay - step_size * (m32 / (v32.sqrt() / bc2_sqrt + eps)))


def _free_kernel(
    ps: list[Tensor], gs: list[Tensor], decay: float, lr_free: float, sign: bool
) -> None:
    """The state-free update of each tensor in one pass: ``p ← p·decay − lr_free·d`` with
    ``d = sign(g)`` (``sign``) or ``g``; one compiled graph per value of ``sign``."""
    for p, g in zip(ps, gs):
        acc = accumulate_dtype(p)
        d = torch.sign(g.to(acc)) if sign else g.to(acc)
        p.copy_(p.to(acc) * decay - lr_free * d)


def _adam_update(
    entries: list[_AdamEntry],
    beta1: float,
    beta2: float,
    eps: float,
    foreach: bool,
    scratch: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """The AdamW rule of the authors' code, in place on ``target``; the loop is the reference.

    ``m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  target ← target − η · m / (sqrt(v)/bc2 + eps)``
    with ``η = step_size = lr / (1 − β1^t)`` and ``bc2 = sqrt(1 − β2^t)`` (``m`` is updated as
    ``m + (1−β1)(g − m)``, torch's form). ``scratch(like)`` gives a reusable buffer for the
    denominator (loop path), avoiding a fresh allocation per tensor and step.
    """
    if not entries:
        return
    if not foreach:
        for target, g, m, v, step_size, bc2_sqrt in entries:
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = torch.sqrt(v, out=scratch(v)) if scratch is not None else v.sqrt()
            denom.div_(bc2_sqrt).add_(eps)
            target.addcdiv_(m, denom, value=-step_size)
        return
    targets = [e[0] for e in entries]
    gs = [e[1] for e in entries]
    ms = [e[2] for e in entries]
    vs = [e[3] for e in entries]
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, [e[5] for e in entries])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(targets, ms, denoms, [-e[4] for e in entries])


def _is_split(group: Mapping[str, Any], p: Tensor) -> bool:
    """Whether ``p`` is split (subspace + state-free rest) under the group's ``split``."""
    split = group["split"]
    return p.dim() >= 2 if split is None else bool(split)


def _split_params(group: Mapping[str, Any]) -> list[Tensor]:
    return [p for p in group["params"] if _is_split(group, p)]


def _resets(group: Mapping[str, Any]) -> bool:
    """Whether the moments of split tensors restart at each refresh (always for blocks)."""
    return group["projection"] == "blocks" or bool(group["reset_statistics"])


def _validate_group(group: Mapping[str, Any]) -> None:
    validate_standard(group, "lr", "betas", "eps", "weight_decay", "on_nonfinite")
    validate_in_range(
        "density",
        group["density"],
        0,
        1,
        hint="; it is the state-full fraction, the paper uses 0.25",
    )
    validate_int(
        "update_gap", group["update_gap"], 1, " (steps between refreshes); the paper uses 200"
    )
    validate_choice("projection", group["projection"], PROJECTIONS)
    validate_choice("block_order", group["block_order"], BLOCK_ORDERS)
    validate_choice("inactive_update_rule", group["inactive_update_rule"], INACTIVE_UPDATE_RULES)
    validate_nonnegative("inactive_lr_scale", group["inactive_lr_scale"])
    validate_nonnegative("proj_params_lr_scale", group["proj_params_lr_scale"])
    validate_choice(
        "split", group["split"], (None, True, False), "; None splits the tensors with dim >= 2"
    )
    validate_int("seed", group["seed"], 0)
    validate_choice("reset_statistics", group["reset_statistics"], (True, False))
    validate_choice("foreach", group["foreach"], (None, True, False))
    validate_choice("fused", group.get("fused"), (None, True, False))
    if group["projection"] == "blocks" and group["block_order"] == "mirror":
        n = len(_split_params(group))
        if _num_active_blocks(n, group["density"]) % 2:
            raise ParameterError(
                f"block_order='mirror' activates tensors in pairs, but round({n} * "
                f"{group['density']}) is odd; choose a density giving an even count or "
                "another block_order"
            )


def _subspace_generator(seed: int, refresh: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, refresh)``: subspaces reproducible from numbers."""
    return torch.Generator().manual_seed((seed * _MIX + refresh) % (2**63 - 1))


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    """The ``(rows, columns)`` view of a parameter used by the column/row projections."""
    if p.dim() == 0:
        return 1, 1
    if p.dim() == 1:
        return 1, p.shape[0]
    return p.shape[0], p.numel() // p.shape[0]


def _gather(t: Tensor, idx: Tensor, axis: int) -> Tensor:
    """The chosen columns (``axis=1``) or rows (``axis=0``) of ``t``'s matrix view."""
    return t.reshape(_matrix_shape(t)).index_select(axis, idx)


def _num_active_blocks(n: int, density: float) -> int:
    # Python's round (half to even), as the official BlockOptimizer: round(0.5) == 0.
    return round(n * density)


def block_selection(n: int, density: float, order: str, seed: int, refresh: int) -> list[int]:
    """Indices of the state-full tensors among a group's ``n`` split tensors in subspace k.

    ``round(n · density)`` whole tensors (official ``num_active_blocks``). ``"random"``: the first
    entries of a permutation drawn from a generator seeded by ``(seed, refresh)`` (the official
    code draws ``torch.randperm`` from the global generator); ``"ascending"`` / ``"descending"``:
    consecutive tensors, moving by that many each refresh; ``"mirror"``: pairs from both ends.

    Example:
        >>> block_selection(8, 0.25, "ascending", seed=0, refresh=1)
        [2, 3]
        >>> block_selection(8, 0.25, "descending", seed=0, refresh=0)
        [7, 6]
    """
    k = _num_active_blocks(n, density)
    if n == 0 or k == 0:
        return []
    if order == "random":
        perm = torch.randperm(n, generator=_subspace_generator(seed, refresh))
        return [int(i) for i in perm[:k]]
    if order == "ascending":
        start = (refresh * k) % n
        return [(start + i) % n for i in range(k)]
    if order == "descending":
        start = (n - 1 - refresh * k) % n
        return [(start - i) % n for i in range(k)]
    half = n // 2  # mirror
    start = (refresh * (k // 2)) % half
    out: list[int] = []
    for i in range(start, start + k // 2):
        out += [i % half, n - 1 - i % half]
    return out
