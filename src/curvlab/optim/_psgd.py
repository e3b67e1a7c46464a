"""What the PSGD optimizers (:class:`~curvlab.optim.psgd_kron.PSGDKron` and
:class:`~curvlab.optim.psgd_lra.PSGDLRA`) share: options, validation, the step skeleton, the
update-probability coin, seeds, the whitening probe, the Lipschitz EMA and the update clip.

Both follow lixilinx/psgd_torch ``psgd.py`` (commit a8616f1): a preconditioner ``P = QᵀQ`` fitted
by gradient whitening, refitted with a probability that anneals
(:func:`precond_update_prob_schedule`), applied to the gradient or its momentum, the result
clipped by RMS and by entry. Randomness comes from generators seeded by hashes of
``(seed, step, ...)`` (:func:`mix_seed`), so a resumed run is bit-identical.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.errors import ParameterError
from curvlab.optim._validation import (
    add_param_group_checked,
    load_state_dict_checked,
    start_step,
    validate_choice,
    validate_in_range,
    validate_nonnegative,
    validate_standard,
)

__all__ = [
    "PSGDOptions",
    "PSGDBase",
    "PSGDStepOptions",
    "clip_update",
    "coin_seed",
    "fit_options",
    "init_scale",
    "lift",
    "mix_seed",
    "precond_update_prob_schedule",
    "probe_seed",
    "update_coin",
    "update_lipschitz",
    "whitening_probe",
]

_MASK64 = (1 << 64) - 1


class PSGDOptions(TypedDict, total=False):
    """Constructor options shared by PSGDKron and PSGDLRA (documented in PSGDKron's Args)."""

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
}


class PSGDBase(Optimizer):
    """The skeleton of a PSGD optimizer: options, validation, ``step`` and ``load_state_dict``.

    A subclass passes its own hyper-parameters to ``__init__`` and implements ``_step_group``
    (``_init_group`` + its functional entry point), ``_validate_extra`` and ``_state_layout``.
    """

    closure_mode: ClassVar[str] = "backward"

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

    def _step_group(self, group: dict[str, Any]) -> None:
        """``_init_group`` and the functional entry point, for one param group."""
        raise NotImplementedError

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float | Tensor] | None = None
    ) -> float | Tensor | None:
        """Take one step; ``closure`` (optional) zeroes grads, computes the loss, calls backward.

        Returns:
            the closure's loss, or ``None`` without a closure.
        """
        loss, proceed = start_step(self, closure)
        if proceed:
            for group in self.param_groups:
                self._step_group(group)
        return loss

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


def init_scale(mean_fourth_power: float, damping: float) -> float:
    """The official automatic initial scale ``(E g⁴ + damping⁴)^{-1/8}`` of ``Q``."""
    return (mean_fourth_power + damping**4) ** (-1.0 / 8.0)


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


def coin_seed(seed: int, step: int) -> int:
    """Seed of the update-probability coin at 0-based ``step`` (shared by all parameters)."""
    return mix_seed(seed, step, 0)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
