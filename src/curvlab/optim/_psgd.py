"""What the PSGD optimizers (:class:`~curvlab.optim.psgd_kron.PSGDKron`,
:class:`~curvlab.optim.psgd_lra.PSGDLRA` and :class:`~curvlab.optim.psgd_xmat.PSGDXMat`) share:
options, validation, the step skeleton, the update-probability coin, seeds, the whitening probe,
the Lipschitz EMA, the update clip, and (:class:`ConcatenatedPSGD`, LRA and XMat) one
preconditioner over the concatenated parameters of a param group.

All follow lixilinx/psgd_torch ``psgd.py`` (commit a8616f1): a preconditioner ``P = QᵀQ`` fitted
by gradient whitening (``fit="whiten"``, ``KronWhiten``/``LRAWhiten``) or, as the seed paper's
Newton-type PSGD (``KronNewton``/``LRANewton``, and ``XMat`` of the legacy
``preconditioned_stochastic_gradient_descent.py``), from a pair ``(v, Hv)``: an exact
Hessian-vector product on a random probe (``fit="hvp"``) or a gradient difference between two
nearby points (``fit="finite_difference"``), :meth:`PSGDBase._pair_start`; refitted with a
probability that anneals
(:func:`precond_update_prob_schedule`), applied to the gradient or its momentum, the result
clipped by RMS and by entry. Randomness comes from generators seeded by hashes of
``(seed, step, ...)`` (:func:`mix_seed`), so a resumed run is bit-identical.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypedDict

import torch
from torch import Generator, Tensor
from torch.optim import Optimizer

from curvlab.errors import ParameterError, StateDictError
from curvlab.operators._context import full_precision
from curvlab.optim._closure import _call_closure, _loss_grads, closure_required
from curvlab.optim._validation import (
    add_param_group_checked,
    check_finite_grads,
    group_options,
    group_step,
    load_state_dict_checked,
    next_step_number,
    start_step,
    validate_choice,
    validate_in_range,
    validate_nonnegative,
    validate_standard,
)

__all__ = [
    "FITS",
    "ConcatenatedPSGD",
    "PSGDOptions",
    "PSGDBase",
    "PSGDStepOptions",
    "clip_update",
    "coin_seed",
    "concatenated_rule",
    "concatenated_step",
    "decayed_columns",
    "fit_options",
    "group_pair",
    "init_scale",
    "lift",
    "mix_seed",
    "pair_init_scale",
    "pair_probe_seed",
    "precond_update_prob_schedule",
    "probe_seed",
    "update_coin",
    "update_lipschitz",
    "whitening_probe",
]

_MASK64 = (1 << 64) - 1

#: How the preconditioner is fitted: gradient whitening, or pairs (v, Hv) from an exact
#: Hessian-vector product or from a gradient difference.
FITS: tuple[str, ...] = ("whiten", "hvp", "finite_difference")

#: A pair ``(v, h)`` per parameter (``None`` on a step without refit): the probe and ``H v``.
Pairs = dict[Tensor, tuple[Tensor, Tensor]]
#: an initial scale: the user's number, or the automatic one as a 0-d tensor on the device
Scale = float | Tensor


class PSGDOptions(TypedDict, total=False):
    """Constructor options shared by the PSGD optimizers (documented in PSGDKron's Args)."""

    preconditioner_lr: float
    beta_lipschitz: float
    damping: float
    momentum: float
    weight_decay: float
    decoupled_weight_decay: bool
    grad_clip_max_amps: tuple[float, float]
    preconditioner_update_probability: float | None
    prob_max: float
    prob_min: float
    prob_decay: float
    prob_flat_start: int
    init_scale: float | None
    update_preconditioner_first: bool
    whiten_grad: bool
    seed: int
    on_nonfinite: str
    fit: str


class PSGDStepOptions(PSGDOptions):
    """The hyper-parameters of one PSGD step: the options and the learning rate."""

    lr: float


#: The official ``KronWhiten``/``LRAWhiten`` defaults, except the annealed update probability.
_DEFAULTS: dict[str, Any] = {
    "preconditioner_lr": 0.1,
    "beta_lipschitz": 0.9,
    "damping": 1e-9,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "decoupled_weight_decay": True,
    "grad_clip_max_amps": (2.0, 10.0),
    "preconditioner_update_probability": None,
    "prob_max": 1.0,
    "prob_min": 0.03,
    "prob_decay": 0.001,
    "prob_flat_start": 500,
    "init_scale": None,
    "update_preconditioner_first": True,
    "whiten_grad": True,
    "seed": 0,
    "on_nonfinite": "raise",
    "fit": "whiten",
}


class PSGDBase(Optimizer):
    """The skeleton of a PSGD optimizer: options, validation, ``step`` and ``load_state_dict``.

    A subclass passes its own hyper-parameters to ``__init__`` and implements ``_step_group``
    (``_init_group`` + its functional entry point), ``_validate_extra`` and ``_state_layout``.
    """

    #: ``"backward"`` (torch contract) with ``fit="whiten"``; ``"loss"`` (set on the instance) with
    #: ``fit="hvp"``/``"finite_difference"``, whose closure returns the loss WITHOUT backward.
    closure_mode: str = "backward"

    def __init__(self, params: Any, own: dict[str, Any], options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - set(_DEFAULTS))
        if unknown:
            raise ParameterError(
                f"{type(self).__name__} got unknown options {unknown}; the PSGD options are "
                f"{', '.join(sorted(_DEFAULTS))}"
            )
        defaults = {**own, **_DEFAULTS, **options, "nonfinite_skips": 0}
        amps = defaults["grad_clip_max_amps"]
        if isinstance(amps, list):
            defaults["grad_clip_max_amps"] = tuple(amps)
        super().__init__(params, defaults)
        if defaults["fit"] != "whiten":
            self.closure_mode = "loss"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (hyper-parameters validated like the constructor's)."""
        add_param_group_checked(self, param_group, self._validate_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("on_nonfinite", "raise")
            group.setdefault("nonfinite_skips", 0)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """The shared ranges (messages name the option and its range), then the subclass's."""

        def num(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
            validate_in_range(name, group[name], lo, hi, lo_open=lo_open, hi_open=hi_open)

        validate_standard(group, "lr", "weight_decay", "on_nonfinite")
        validate_nonnegative("damping", group["damping"], "; the official default is 1e-9")
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
                "grad_clip_max_amps must be two positive numbers (max RMS, max |entry|), "
                f"got {amps!r}"
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
        validate_choice("whiten_grad", group["whiten_grad"], (True, False))
        if not group["whiten_grad"] and not group["momentum"] > 0.0:
            raise ParameterError(
                "whiten_grad=False whitens the momentum, which needs momentum > 0; pass e.g. "
                "momentum=0.9 or whiten_grad=True"
            )
        if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
            raise ParameterError(f"seed must be an int, got {group['seed']!r}")
        validate_choice(
            "fit",
            group["fit"],
            FITS,
            " ('whiten': gradient whitening; 'hvp': Hessian-vector products on random probes; "
            "'finite_difference': gradient differences)",
        )
        if group["fit"] != self.defaults["fit"]:
            raise ParameterError(
                f"fit is optimizer-wide (it sets the closure contract): the constructor's is "
                f"{self.defaults['fit']!r}, a param group asks for {group['fit']!r}; leave fit "
                "out of the param groups"
            )
        self._validate_extra(group)

    def _validate_extra(self, group: dict[str, Any]) -> None:
        """The subclass's own hyper-parameters."""
        raise NotImplementedError

    def _state_layout(self) -> tuple[list[str], list[str], list[str]]:
        """(state keys, keys of other shapes checked by ``_check_shapes``, Lipschitz keys)."""
        raise NotImplementedError

    def _check_shapes(self, state_dict: Mapping[str, Any]) -> None:
        """Check the factor shapes of a state_dict against the parameters (before loading)."""
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any], pairs: Pairs | None) -> None:
        """``_init_group`` and the functional entry point, for one param group; ``pairs``: the
        ``(v, Hv)`` of each parameter on a refit step of a pair fit (``None`` when whitening)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None
    ) -> float | Tensor | None:
        """Take one step.

        ``fit="whiten"``: ``closure`` (optional) zeroes grads, computes the loss, calls backward
        (torch contract). ``fit="hvp"``/``"finite_difference"``: ``closure`` (required) returns
        the loss, or ``(loss, outputs)``, WITHOUT calling backward; the optimizer takes the
        gradient, and on a refit step the pair ``(v, Hv)``, itself (:meth:`_pair_start`).

        Returns:
            the closure's loss (detached for a pair fit), or ``None`` without a closure.

        Raises:
            ClosureRequiredError: a pair fit without a closure, or with one that calls
                ``backward()`` or returns no loss tensor.
        """
        if self.defaults["fit"] == "whiten":
            loss, proceed = start_step(self, closure)
            pairs = None
        else:
            loss, proceed, pairs = self._pair_start(closure)
        if proceed:
            # the preconditioner algebra runs in the parameters' dtype whatever autocast region
            # the loop is in (inside one, matmuls would come out in bfloat16)
            with full_precision():
                for group in self.param_groups:
                    self._step_group(group, pairs)
        return loss

    def _pair_start(self, closure: object) -> tuple[Tensor, bool, Pairs]:
        """Gradients into ``p.grad`` and, if a group refits at this step, the pairs ``(v, h)``.

        Rule (official ``KronNewton.step``/``LRANewton.step``): ``v ~ N(0, I)`` per parameter
        (a generator seeded by :func:`pair_probe_seed`); ``fit="hvp"``: ``h = ∂(gᵀv)/∂θ = H v``
        by double backward through the closure's graph; ``fit="finite_difference"``:
        ``θ ← θ + δ v``, ``g' = ∇L(θ)``, ``h = (g' - g)/δ``, ``θ ← θ - δ v`` with
        ``δ = √ε`` of the parameters' dtype (the closure must be a deterministic function of the
        parameters). A group refits at its step ``t`` when :func:`update_coin` says so, and
        always at ``t = 0`` (the initial scale comes from the first pair, as the official code).

        Returns:
            ``(detached loss, proceed, pairs)``; ``pairs`` is empty when no group refits.
        """
        name = type(self).__name__
        if closure is None:
            raise closure_required(
                name,
                f" ({name}(fit={self.defaults['fit']!r}) fits its "
                "preconditioner from Hessian-vector products)",
            )
        groups = self.param_groups
        params = [p for g in groups for p in g["params"] if p.requires_grad]
        loss, _ = _call_closure(closure, params, name)
        due = [
            (g, t)
            for g in groups
            if (t := group_step(self, g)) == 0 or update_coin(g, t)  # type: ignore[arg-type]
        ]
        hvp = self.defaults["fit"] == "hvp" and bool(due)
        grads = _loss_grads(loss, params, create_graph=hvp, retain_graph=hvp)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.detach()
        if not check_finite_grads(groups, step=lambda: next_step_number(self)):
            return loss.detach(), False, {}
        pairs: Pairs = {}
        if not due:
            return loss.detach(), True, pairs
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        vs: dict[Tensor, Tensor] = {}
        for group, t in due:
            for index, p in enumerate(group["params"]):
                if p.grad is not None:
                    gen = seeded_generator(pair_probe_seed(int(group["seed"]), t, index), p.device)
                    vs[p] = torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen)
        ps = [p for p, _ in used]
        probes = [vs[p] if p in vs else torch.zeros_like(p) for p in ps]
        if hvp:
            with torch.enable_grad():
                hs = torch.autograd.grad([g for _, g in used], ps, probes, allow_unused=True)
            hs = tuple(torch.zeros_like(p) if h is None else h for p, h in zip(ps, hs))
        else:
            hs = self._finite_difference(closure, params, ps, probes)
        for p, v, h in zip(ps, probes, hs):
            if p in vs:
                pairs[p] = (v, h.detach())
        return loss.detach(), True, pairs

    def _finite_difference(
        self, closure: object, params: list[Tensor], ps: list[Tensor], probes: list[Tensor]
    ) -> tuple[Tensor, ...]:
        """``(∇L(θ + δv) - ∇L(θ))/δ`` per parameter, ``δ = √ε`` (official finite difference);
        ``p.grad`` keeps ``∇L(θ)``."""
        delta = max(torch.finfo(p.dtype).eps for p in ps) ** 0.5
        kept = [p.grad for p in params]
        for p, v in zip(ps, probes):
            p.add_(v, alpha=delta)
        loss, _ = _call_closure(closure, params, type(self).__name__)
        moved = _loss_grads(loss, ps, create_graph=False, retain_graph=False)
        for p, v in zip(ps, probes):
            p.sub_(v, alpha=delta)
        for p, g in zip(params, kept):
            p.grad = g
        return tuple(
            torch.zeros_like(p) if m is None else (m - p.grad) / delta  # type: ignore[operator]
            for p, m in zip(ps, moved)
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, after checking its layout.

        The Lipschitz estimates keep their saved dtype (float32 next to half-precision factors).

        Raises:
            StateDictError: the number of groups or parameters, the keys or the factor shapes
                differ from this optimizer's.
        """
        keys, free, lipschitz = self._state_layout()
        load_state_dict_checked(
            self,
            state_dict,
            state_keys=keys,
            param_shaped_keys=("momentum_buffer",),
            keep_dtype_keys=lipschitz,
            free_shape_keys=free,
            check_shapes=self._check_shapes,
        )


class ConcatenatedPSGD(PSGDBase):
    """A PSGD optimizer with one preconditioner over the parameters of a param group concatenated
    (``N`` entries; LRA and XMat).

    Each parameter's state holds its rows of the group's factors (``_FACTOR_KEYS``) as consecutive
    views of one buffer, plus ``step``, the group's Lipschitz estimates (``_LIPSCHITZ_KEYS``, the
    same values in every parameter) and ``momentum_buffer``. A parameter without a gradient at a
    step is left out of that step's preconditioner. A subclass sets the two key tuples and
    implements ``_new_factors``, ``_factor_shapes`` and ``_step_group``.
    """

    _FACTOR_KEYS: ClassVar[tuple[str, ...]]
    _LIPSCHITZ_KEYS: ClassVar[tuple[str, ...]]

    def _new_factors(
        self, group: dict[str, Any], total: int, scale: Scale, ref: Tensor, gen: Generator | None
    ) -> dict[str, Tensor]:
        """The official initial factors over ``total`` concatenated entries (rows first)."""
        raise NotImplementedError

    def _factor_shapes(self, saved_group: Mapping[str, Any], n: int) -> dict[str, tuple[int, ...]]:
        """The shape of each factor's rows for a parameter of ``n`` entries."""
        raise NotImplementedError

    def _functional(self) -> Callable[..., None]:
        """The functional entry point (``psgd_lra``, ``psgd_xmat``)."""
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any], pairs: Pairs | None) -> None:
        lists: tuple[list[Any], ...] = ([], [], [], [], [])
        if any(p.grad is not None for p in group["params"]):
            precond = self._init_group(group, pairs, *lists)
            pair = group_pair(lists[0], pairs)
            options = group_options(group, PSGDStepOptions)
            self._functional()(*lists, precond=precond, pair=pair, **options)

    def _init_group(
        self, group: dict[str, Any], pairs: Pairs | None, *lists: list[Any]
    ) -> tuple[Tensor, ...]:
        """Create the state of new parameters (official initialisation over them); append every
        parameter with a gradient to ``lists = (params, grads, momentum_buffers, lipschitz,
        state_steps)``; return the group's factors over those, one tensor each whose row blocks
        are the parameters' state entries.
        """
        ps = [p for p in group["params"] if p.grad is not None]
        new = [p for p in ps if len(self.state[p]) == 0]
        if new:
            self._init_states(group, new, pairs)
        for p in ps:
            st = self.state[p]
            lipschitz = [st[k] for k in self._LIPSCHITZ_KEYS]
            entries = (p, p.grad, st.get("momentum_buffer"), lipschitz, st["step"])
            for lst, entry in zip(lists, entries):
                lst.append(entry)
        return tuple(self._flat(ps, key) for key in self._FACTOR_KEYS)

    def _flat(self, ps: list[Tensor], key: str) -> Tensor:
        """The group's factor ``key`` as one tensor whose row blocks are the state entries.

        The per-parameter entries are kept as consecutive views of one buffer, so a refit runs in
        place on the concatenation without copying. If they are not (after a parameter was left
        out of a step, or a ``load_state_dict`` that cast them), they are concatenated once and
        the state entries are re-pointed to views of the new buffer.
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

    def _init_states(self, group: dict[str, Any], new: list[Tensor], pairs: Pairs | None) -> None:
        """Official initialisation over the new parameters (all of them at the first step): the
        scale from ``init_scale``, the pairs or the gradients, then :meth:`_new_factors`."""
        sizes = [p.numel() for p in new]
        ref = new[0]
        scale = group["init_scale"]
        if scale is None and pairs:
            v, h = group_pair(new, pairs)  # type: ignore[misc]
            scale = pair_init_scale([v], [h], float(group["damping"]))
        elif scale is None:
            gn = torch.cat([init_grad(p, group).reshape(-1) for p in new])
            scale = init_scale(wide(torch.mean(lift(gn) ** 4)), float(group["damping"]))
        gen = seeded_generator(mix_seed(int(group["seed"]), -1, 0), ref.device)
        factors = self._new_factors(group, sum(sizes), scale, ref, gen)
        start = 0
        for p, n in zip(new, sizes):
            st = self.state[p]
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in self._FACTOR_KEYS:
                st[key] = factors[key][start : start + n]
            for key in self._LIPSCHITZ_KEYS:
                st[key] = torch.zeros([], dtype=lipschitz_dtype(p.dtype), device=p.device)
            if group["momentum"] > 0.0:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            start += n

    def _state_layout(self) -> tuple[list[str], list[str], list[str]]:
        keys = ["step", *self._FACTOR_KEYS, *self._LIPSCHITZ_KEYS, "momentum_buffer"]
        return keys, list(self._FACTOR_KEYS), list(self._LIPSCHITZ_KEYS)

    def _check_shapes(self, state_dict: Mapping[str, Any]) -> None:
        for sg, g in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                st = state_dict["state"].get(pid)
                if st is None:
                    continue
                for key, shape in self._factor_shapes(sg, p.numel()).items():
                    value = st.get(key)
                    if value is None or tuple(value.shape) != shape:
                        got = None if value is None else tuple(value.shape)
                        raise StateDictError(
                            f"state {key!r} of parameter id {pid!r} has shape {got}, expected "
                            f"{shape} for a parameter of shape {tuple(p.shape)}; the state_dict "
                            "was saved for a different model or another optimizer"
                        )


def decayed_columns(
    params: Sequence[Tensor], grads: Sequence[Tensor], options: PSGDStepOptions
) -> list[Tensor]:
    """The gradients as ``[n_j, 1]`` columns after weight decay: ``θ ← θ(1 - lr·wd)`` in place
    (decoupled) or ``g + wd·θ`` (coupled)."""
    lr, wd = float(options["lr"]), float(options["weight_decay"])
    gs = []
    for p, g in zip(params, grads):
        if wd != 0.0:
            if options["decoupled_weight_decay"]:
                p.mul_(1.0 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        gs.append(g.reshape(-1, 1))
    return gs


#: ``fit(L, v, h, generator)``: fit a concatenated preconditioner on the pair ``(v, h)``, in place.
ConcatenatedFit = Callable[[list[Tensor], Tensor, Tensor, torch.Generator | None], None]

#: ``blockwise(ps, grads, momentum_buffers, t, options)``: a step without refit, block by block.
BlockwiseStep = Callable[[list[Tensor], list[Tensor], list[Any], int, PSGDStepOptions], None]


def concatenated_rule(
    lists: Sequence[list[Any]],
    pair: tuple[Tensor, Tensor] | None,
    options: PSGDStepOptions,
    *,
    fit: ConcatenatedFit,
    apply: Callable[[Tensor], Tensor],
    blockwise: BlockwiseStep | None = None,
) -> None:
    """The step of a preconditioner over a group's concatenated parameters (LRA, XMat), in place.

    ``lists = (params, grads, momentum_buffers, lipschitz, state_steps)``. Weight decay
    (:func:`decayed_columns`); the refit decision at the group's step ``t``: the coin
    (:func:`update_coin`) when whitening, a pair given otherwise; :func:`concatenated_step` with
    ``fit`` on a refit step, without it else (or ``blockwise``, if given, on a step without
    refit); then every ``state_steps`` entry ``+= 1``.
    """
    params, grads, momentum_buffers, lipschitz, state_steps = lists
    gs = decayed_columns(params, grads, options)
    t = int(state_steps[0].item())
    whiten = options.get("fit", "whiten") == "whiten"
    refit = update_coin(options, t) if whiten else pair is not None
    if refit or blockwise is None:
        lists4 = (params, gs, momentum_buffers, lipschitz)
        concatenated_step(*lists4, t, pair, options, fit=fit if refit else None, apply=apply)
    else:
        blockwise(params, gs, momentum_buffers, t, options)
    torch._foreach_add_(state_steps, torch.tensor(1.0), alpha=1.0)


def concatenated_step(
    ps: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    lipschitz: list[list[Tensor]],
    t: int,
    pair: tuple[Tensor, Tensor] | None,
    options: PSGDStepOptions,
    *,
    fit: ConcatenatedFit | None,
    apply: Callable[[Tensor], Tensor],
) -> None:
    """One step on a group's concatenated vectors (``grads``: ``[n_j, 1]`` columns), in place.

    Rule (official ``LRAWhiten.step``/``LRANewton.step``, the ``XMat`` class)::

        m = g, or m ← β_t m + (1-β_t) g with β_t = min(t/(t+1), momentum)
        if fit: (v, h) = whitening probe of (g if whiten_grad else m), or pair with h damped
                fit(L, v, h) before (update_preconditioner_first) or after applying P
        u = apply(m) = P m;  u ← u·min(1, c₁/RMS(u));  u ← clamp(u, ±c₂);  θ ← θ - lr·u

    ``fit=None``: no refit at this step. The generator of the probe and the fit's coins is seeded
    by ``(seed, t, 1)``; the group's Lipschitz estimates are written back into every parameter.
    """
    g = torch.cat(grads)
    L = [x.clone() for x in lipschitz[0]]
    momentum = float(options["momentum"])
    if momentum > 0.0:
        m = torch.cat([b.reshape(-1, 1) for b in momentum_buffers])  # type: ignore[union-attr]
        beta = min(t / (t + 1.0), momentum)
        m.mul_(beta).add_(g, alpha=1.0 - beta)
    else:
        m = g
    first = options["update_preconditioner_first"]
    if fit is not None:
        gen = seeded_generator(mix_seed(int(options["seed"]), t, 1), g.device)
        damping = float(options["damping"])
        if pair is None:
            v, h = whitening_probe(g if options["whiten_grad"] else m, damping, gen)
        else:
            v, h = pair[0], pair_damped(pair[1], damping, gen)
        if first:
            fit(L, v, h, gen)
    u = apply(m)
    if fit is not None and not first:
        fit(L, v, h, gen)
    u = clip_update(u, options["grad_clip_max_amps"])
    start = 0
    for p, buf, lip in zip(ps, momentum_buffers, lipschitz):
        n = p.numel()
        p.sub_(u[start : start + n].reshape(p.shape), alpha=float(options["lr"]))
        if buf is not None:
            buf.copy_(m[start : start + n].reshape(p.shape))
        if fit is not None:
            torch._foreach_copy_(lip, L)
        start += n


class FitOptions(TypedDict):
    """The keyword arguments of a preconditioner fit."""

    lr: float
    beta_lipschitz: float
    damping: float


def fit_options(options: PSGDStepOptions) -> FitOptions:
    """The keyword arguments of a preconditioner fit: its step, Lipschitz EMA and damping."""
    return {
        "lr": options["preconditioner_lr"],
        "beta_lipschitz": options["beta_lipschitz"],
        "damping": options["damping"],
    }


def lift(x: Tensor) -> Tensor:
    """Half precision to float32 (official ``lift2single``); float32/float64 unchanged."""
    return x.float() if torch.finfo(x.dtype).eps > 1e-6 else x


def update_lipschitz(L: Tensor, ell: Tensor, beta: float) -> Tensor:
    """``L ← max(β L + (1-β) ℓ, ℓ)`` in place; returns the new ``L`` (official Lipschitz EMA)."""
    ell = ell.to(L.dtype)
    L.copy_(torch.maximum(beta * L + (1 - beta) * ell, ell))
    return L


def whitening_probe(
    g: Tensor, damping: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The whitening pair: ``v ~ N(0, I)`` (first draw from ``generator``) and
    ``h = g + (damping + ε|g|) ⊙ v`` with ``ε`` the machine epsilon of ``g``'s dtype."""
    v = torch.randn(g.shape, dtype=g.dtype, device=g.device, generator=generator)
    h = torch.addcmul(g, g.abs().mul_(torch.finfo(g.dtype).eps).add_(damping), v)
    return v, h


def clip_update(u: Tensor, max_amps: tuple[float, float], rms: Tensor | None = None) -> Tensor:
    """``u ← u · min(1, c₁ / RMS(u))``, then ``clamp(u, ±c₂)``, in place (``(c₁, c₂) = max_amps``).

    ``rms``: the RMS to use, if ``u`` is one block of a larger vector.
    """
    max_avg, max_elem = max_amps
    if rms is None:
        rms = torch.linalg.vector_norm(u) / math.sqrt(max(u.numel(), 1))
    return u.mul_(torch.clamp(max_avg / rms, max=1.0)).clamp_(-max_elem, max_elem)


def init_scale(mean_fourth_power: Tensor, damping: float) -> Tensor:
    """The official automatic initial scale ``(E g⁴ + damping⁴)^{-1/8}`` of ``Q``, a 0-d
    tensor where ``mean_fourth_power`` is (nothing read back to the host)."""
    return (mean_fourth_power + damping**4) ** (-1.0 / 8.0)


def wide(x: Tensor) -> Tensor:
    """``x`` in float64 where it lives (float32 on MPS, which has no float64): the initial scales
    are computed on the device in the precision the official code computes them on the host."""
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def init_grad(p: Tensor, group: Mapping[str, Any]) -> Tensor:
    """The gradient the initial scale sees: with ``wd · p`` added under coupled weight decay."""
    g = p.grad
    assert g is not None
    if group["weight_decay"] != 0.0 and not group["decoupled_weight_decay"]:
        g = g.add(p, alpha=group["weight_decay"])
    return g


def lipschitz_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Lipschitz estimates for factors of ``dtype`` (float32 for half)."""
    return lift(torch.empty(0, dtype=dtype)).dtype


def precond_update_prob_schedule(
    step: int,
    max_prob: float = 1.0,
    min_prob: float = 0.03,
    decay: float = 0.001,
    flat_start: int = 500,
) -> float:
    """Probability of refitting the preconditioner at (0-based) ``step``.

    ``p(n) = clip(max_prob · exp(-decay (n - flat_start)), min_prob, max_prob)``: 1 for the first
    500 steps, then an exponential anneal that reaches 0.03 near step 4000 (kron-torch's
    ``precond_update_prob_schedule``; the official DDP wrapper ``KWNS4`` asks to anneal the
    probability to 0.01–0.1).

    Example:
        >>> precond_update_prob_schedule(0), round(precond_update_prob_schedule(1500), 4)
        (1.0, 0.3679)
    """
    p = max_prob * math.exp(-decay * (step - flat_start))
    return min(max(p, min_prob), max_prob)


def update_coin(options: PSGDStepOptions, step: int) -> bool:
    """Whether to refit the preconditioner at (0-based) ``step``: a coin seeded by
    ``(seed, step)``, shared by every parameter of the group, against the probability."""
    p = options["preconditioner_update_probability"]
    if p is None:
        p = precond_update_prob_schedule(
            step,
            options["prob_max"],
            options["prob_min"],
            options["prob_decay"],
            int(options["prob_flat_start"]),
        )
    return _coin_draw(int(options["seed"]), step) < p


@functools.lru_cache(maxsize=256)
def _coin_draw(seed: int, step: int) -> float:
    """The uniform draw of the coin at ``(seed, step)`` (a pure function: cached)."""
    gen = torch.Generator().manual_seed(coin_seed(seed, step))
    return torch.rand([], generator=gen).item()


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser); the same on every run and platform."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def probe_seed(seed: int, step: int, index: int) -> int:
    """Seed of the generator of the ``index``-th parameter of a param group at 0-based ``step``."""
    return mix_seed(seed, step, index + 1)


def pair_probe_seed(seed: int, step: int, index: int) -> int:
    """Seed of the probe ``v`` of the pair ``(v, Hv)`` of the ``index``-th parameter at ``step``."""
    return mix_seed(seed, step, index + 1, 2)


def pair_init_scale(vs: list[Tensor], hs: list[Tensor], damping: float) -> Tensor:
    """The official initial scale of ``Q`` from pairs: ``(mean v²)^{1/4} (max_j mean h_j⁴ +
    damping⁴)^{-1/8}``, ``mean v²`` over all probes, the max over the tensors of ``hs``; a 0-d
    tensor on the first probe's device."""
    dev = vs[0].device
    v2 = sum(wide(torch.sum(lift(v) ** 2)).to(dev) for v in vs) / sum(v.numel() for v in vs)
    h4 = torch.stack([wide(torch.mean(lift(h).abs() ** 4)).to(dev) for h in hs]).amax()
    return v2**0.25 * init_scale(h4, damping)


def group_pair(ps: list[Tensor], pairs: Pairs | None) -> tuple[Tensor, Tensor] | None:
    """The pairs of ``ps`` concatenated as ``[N, 1]`` columns, or ``None`` if ``ps`` has none."""
    if not pairs or ps[0] not in pairs:
        return None
    v = torch.cat([pairs[p][0].reshape(-1, 1) for p in ps])
    h = torch.cat([pairs[p][1].reshape(-1, 1) for p in ps])
    return v, h


def pair_damped(h: Tensor, damping: float, generator: torch.Generator | None) -> Tensor:
    """``h + (damping + ε|h|) ⊙ n``, ``n ~ N(0, I)`` from ``generator`` (official
    ``update_precond_kron_newton_*``/``update_precond_lra_newton``: bounds ``P < I/damping``)."""
    return whitening_probe(h, damping, generator)[1]


def coin_seed(seed: int, step: int) -> int:
    """Seed of the update-probability coin at 0-based ``step`` (shared by all parameters)."""
    return mix_seed(seed, step, 0)


def host_uniform(generator: torch.Generator | None) -> float:
    """A uniform draw in ``[0, 1)`` for a coin of the fit, made on the host (no device sync).

    From ``generator`` itself when it is a CPU generator, or from torch's default CPU generator
    when it is ``None`` (the official code's ``torch.rand([])``). A generator on an accelerator
    keeps its seed and offset on the host: the draw comes from a CPU generator seeded by both, and
    the offset is advanced past it, so successive coins differ and follow the device stream
    without reading the device. A device generator without an offset (none in torch's CUDA, XPU
    or MPS today) draws on the device and reads the result back.
    """
    if generator is None or generator.device.type == "cpu":
        return torch.rand([], generator=generator).item()
    try:
        offset = generator.get_offset()
        generator.set_offset(offset + 4)  # Philox offsets advance in multiples of 4
    except (RuntimeError, AttributeError):  # pragma: no cover - no such device generator here
        return torch.rand([], generator=generator, device=generator.device).item()
    seed = mix_seed(generator.initial_seed(), offset, 2)
    return torch.rand([], generator=torch.Generator().manual_seed(seed)).item()


def seeded_generator(seed: int, device: torch.device) -> torch.Generator | None:
    """A fresh generator on ``device`` seeded with ``seed``; ``None`` on the ``meta`` device
    (shapes without values: there is no stream to follow)."""
    if device.type == "meta":
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
