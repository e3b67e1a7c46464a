"""Optimizer lookup for the harness and the gradient-equivalent cost rule.

Names resolve through curvlab's optimizer registry (``curvlab.optim.registry.OPTIMIZERS``, created
with ``curvlab.optim.create``); a name of the form ``"package.module:ClassName"`` imports any other
``torch.optim.Optimizer`` subclass, so a user can benchmark their own optimizer under the same
script (``"torch.optim:AdamW"`` benchmarks torch's own AdamW).

**Gradient-equivalent clock (GE).** One forward + backward pass = 1 GE, a Hessian-vector product =
2, a Gauss-Newton-Bartlett (GNB) pass = 1. Per step:

1. every call of the closure counts 1 gradient (a ``closure_mode == "backward"`` closure calls
   backward itself; a ``"loss"``-mode optimizer differentiates the returned loss once);
2. curvature work on top: if the optimizer exposes ``cost_counters() -> Mapping[str, int]`` with
   cumulative ``"hvps"`` and/or ``"gnb"`` counts, the per-step increments are used (exact);
3. otherwise, for ``"loss"``-mode optimizers only, it is estimated: a refresh every ``k`` steps
   (``k`` read from the first param group under one of ``k``, ``update_period``,
   ``hessian_update_interval``, ``update_each``, ``precond_update_interval``, ``refresh_every``;
   default 1), on steps ``t`` with ``t mod k == 0`` (t from 0), costing 1 GE if the estimator is
   GNB (class name contains ``"SophiaG"`` or the group's ``estimator``/``hessian_estimator`` is
   ``"gnb"``) and otherwise 2 GE per probe (``num_probes``/``n_samples``/``hessian_samples``,
   default 1).

**Harness hyperparameters.** A run's hyperparameters may hold keys the harness reads itself
(:data:`HARNESS_KEYS`), the same for every optimizer: ``schedule`` (``"constant"``, the default, or
``"cosine"``: linear warm-up then cosine decay to 0 at the run's budget, :class:`curvlab.schedules.
Cosine` in a ``LambdaLR``), ``warmup`` (the warm-up's fraction of the budget, in ``[0, 1)``),
``beta1`` and ``beta2`` (the two halves of ``betas``, the other half from the optimizer's own
default, so a search can tune β₂ alone).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from curvlab.bench.problems import closest
from curvlab.errors import ParameterError, UnknownNameError
from curvlab.optim import registry

__all__ = [
    "HARNESS_KEYS",
    "SCHEDULES",
    "CostModel",
    "check_schedule",
    "closure_mode_of",
    "constructor_kwargs",
    "known_optimizers",
    "make_optimizer",
    "make_scheduler",
    "resolve_optimizer",
]

#: Hyperparameter keys the harness reads itself (not constructor arguments as such).
HARNESS_KEYS = ("schedule", "warmup", "beta1", "beta2")
#: The learning-rate schedules a run can name.
SCHEDULES = ("constant", "cosine")

_PERIOD_KEYS = (
    "k",
    "update_period",
    "hessian_update_interval",
    "update_each",
    "precond_update_interval",
    "refresh_every",
)
_PROBE_KEYS = ("num_probes", "n_samples", "hessian_samples")


def known_optimizers() -> list[str]:
    """Sorted names in curvlab's optimizer registry."""
    return registry.available()


def resolve_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for a registry name or a ``"module:Class"`` import path.

    Raises:
        UnknownNameError: the name is neither registered nor importable (lists the known names).

    Example:
        >>> resolve_optimizer("torch.optim:SGD").__name__
        'SGD'
    """
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UnknownNameError(
                f"cannot import optimizer {name!r} ({exc}); give 'package.module:ClassName' of a "
                "torch.optim.Optimizer subclass, or a registry name"
            ) from exc
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise UnknownNameError(f"{name!r} is not a torch.optim.Optimizer subclass")
        return cls
    cls = registry.lookup(name)
    if cls is None:
        known = known_optimizers()
        raise UnknownNameError(
            f"unknown optimizer {name!r}.{closest(name, known)} Known optimizers: "
            f"{', '.join(known)}; any torch optimizer "
            "can be named as 'package.module:ClassName', e.g. 'torch.optim:AdamW'"
        )
    return cls


def make_optimizer(
    name: str, params: Any, hparams: Mapping[str, Any], *, seed: int | None = None
) -> torch.optim.Optimizer:
    """Construct ``name`` on ``params`` with ``hparams``.

    Args:
        name: a registry name or ``"module:Class"``.
        params: the parameters (or parameter groups).
        hparams: keyword arguments of the constructor.
        seed: when given, an optimizer whose constructor takes ``generator`` (and ``hparams`` has
            none) gets ``torch.Generator().manual_seed(seed)``, so its random probes repeat.
    """
    cls = resolve_optimizer(name)
    kwargs = constructor_kwargs(cls, hparams)
    if seed is not None and "generator" not in kwargs:
        try:
            takes = "generator" in inspect.signature(cls).parameters
        except (TypeError, ValueError):  # a signature Python cannot read
            takes = False
        if takes:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
    return cls(params, **kwargs)


def constructor_kwargs(cls: type, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``cls`` for a run's ``hparams``.

    The schedule keys are dropped; ``beta1``/``beta2`` become ``betas`` with the other half taken
    from ``betas`` in ``hparams`` or else ``cls``'s default.

    Raises:
        ParameterError: ``beta1``/``beta2`` for an optimizer without a ``betas`` argument.

    Example:
        >>> constructor_kwargs(torch.optim.AdamW, {"lr": 0.1, "beta2": 0.99, "schedule": "cosine"})
        {'lr': 0.1, 'betas': (0.9, 0.99)}
    """
    kwargs = {k: v for k, v in hparams.items() if k not in HARNESS_KEYS}
    halves = {k: hparams[k] for k in ("beta1", "beta2") if k in hparams}
    if halves:
        try:
            default = inspect.signature(cls).parameters["betas"].default
        except (KeyError, TypeError, ValueError):
            raise ParameterError(
                f"{cls.__name__} takes no 'betas', so 'beta1'/'beta2' mean nothing for it; "
                "remove them from the suite entry"
            ) from None
        b1, b2 = kwargs.get("betas", default)
        kwargs["betas"] = (float(halves.get("beta1", b1)), float(halves.get("beta2", b2)))
    return kwargs


def check_schedule(hparams: Mapping[str, Any]) -> tuple[str, float]:
    """``(schedule, warmup)`` of a run's ``hparams``, checked (defaults ``"constant"``, 0).

    Raises:
        ParameterError: an unknown schedule or a warm-up fraction outside ``[0, 1)``.
    """
    name = hparams.get("schedule", "constant")
    warmup = hparams.get("warmup", 0.0)
    if name not in SCHEDULES:
        raise ParameterError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 1:
        raise ParameterError(
            f"warmup is the warm-up's fraction of the budget, in [0, 1); got {warmup!r}"
        )
    return str(name), float(warmup)


def make_scheduler(
    optimizer: torch.optim.Optimizer, hparams: Mapping[str, Any], budget_steps: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The learning-rate scheduler a run's ``hparams`` ask for over ``budget_steps`` steps.

    ``None`` for the constant schedule; for ``"cosine"`` a ``LambdaLR`` with
    :class:`curvlab.schedules.Cosine` (``warmup`` = ``round(warmup × budget)`` steps, decay to 0 at
    the budget), to be stepped once after every optimizer step.

    Raises:
        ParameterError: an unknown schedule or a warm-up fraction outside ``[0, 1)``.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([p], lr=1.0)
        >>> s = make_scheduler(opt, {"schedule": "cosine", "warmup": 0.5}, 4)
        >>> [round(g["lr"], 3) for g in opt.param_groups]
        [0.5]
    """
    name, warmup = check_schedule(hparams)
    if name == "constant":
        return None
    from curvlab.schedules import Cosine

    total = max(int(budget_steps), 1)
    factor = Cosine(total=total, warmup=min(round(warmup * total), total - 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def closure_mode_of(optimizer: torch.optim.Optimizer) -> str:
    """``"loss"`` for optimizers that differentiate the closure's loss, else ``"backward"``."""
    mode = getattr(optimizer, "closure_mode", "backward")  # the instance: PSGD(fit="hvp") sets it
    return "loss" if mode == "loss" else "backward"


class CostModel:
    """Counts gradient-equivalents of optimizer steps by the rule in this module's docstring.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> cm = CostModel(torch.optim.SGD([p], lr=0.1))
        >>> cm.step_cost(closure_calls=1)
        (1.0, 0)
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.mode = closure_mode_of(optimizer)
        self._counters = getattr(optimizer, "cost_counters", None)
        self._last = self._read() if callable(self._counters) else None
        self.steps = 0
        group = optimizer.param_groups[0]
        self.period = next(
            (int(group[k]) for k in _PERIOD_KEYS if isinstance(group.get(k), int)), 1
        )
        est = str(group.get("estimator", group.get("hessian_estimator", ""))).lower()
        self.gnb = "gnb" in est or "sophiag" in type(optimizer).__name__.lower()
        self.probes = next((int(group[k]) for k in _PROBE_KEYS if isinstance(group.get(k), int)), 1)
        self.exact = callable(self._counters)

    def _read(self) -> tuple[int, int]:
        c = self._counters()  # type: ignore[misc]
        return int(c.get("hvps", 0)), int(c.get("gnb", 0))

    def step_cost(self, closure_calls: int) -> tuple[float, int]:
        """``(gradient-equivalents, HVPs)`` of the step just taken."""
        ge = float(closure_calls)
        hvps = 0
        if self._last is not None:
            now = self._read()
            hvps, gnb = now[0] - self._last[0], now[1] - self._last[1]
            self._last = now
            ge += 2.0 * hvps + gnb
        elif self.mode == "loss" and self.steps % max(self.period, 1) == 0:
            if self.gnb:
                ge += 1.0
            else:
                hvps = self.probes
                ge += 2.0 * hvps
        self.steps += 1
        return ge, hvps
