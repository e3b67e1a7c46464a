"""Sharpness λ_max(H) against the optimizer's stability threshold (edge of stability).

On a quadratic with curvature λ, GD with step η is stable iff λ < 2/η; heavy-ball momentum β
raises the threshold to (2 + 2β)/η and Nesterov momentum gives (2 + 2β)/((1 + 2β)η). Cohen et al.
(2021) found that full-batch GD on neural networks *progressively sharpens* until λ_max(H) reaches
2/η and then hovers there (the edge of stability). For Adam, the relevant quantity is the
preconditioned sharpness λ_max(P⁻¹H), with P = (1 − β₁ᵗ)·(diag(sqrt(v_t/(1 − β₂ᵗ))) + ε) the
matrix that the update −η P⁻¹ m_t divides by, and the threshold is (2 + 2β₁)/((1 − β₁)η) = 38/η for
β₁ = 0.9 (Cohen et al. 2022). For SGD's linear stability the relevant bound involves tr(H): a
minimum is linearly stable for SGD only if tr(H) ≲ 2/η (Wu, Ma & E 2018), reported as
``trace_ratio = tr(H)·η/2``.

λ_max comes from Lanczos (:func:`curvlab.eigsh`, ``which="LA"``) warm-started from the previous
check's top eigenvector, so after the first check a few HVPs usually suffice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.errors import InvalidArgumentError
from curvlab.estimators import trace
from curvlab.monitors._attach import LossFn
from curvlab.monitors._curvature import EigenMonitor, ScaledOperator, optimizer_group

__all__ = ["Sharpness", "adam_preconditioner", "stability_threshold"]


def stability_threshold(
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    dampening: float = 0.0,
    adam_beta1: float | None = None,
) -> float:
    """The largest (preconditioned) curvature at which the optimizer is stable on a quadratic.

    GD: 2/η; heavy ball: (2 + 2β)/(η(1 − τ)) with dampening τ; Nesterov: (2 + 2β)/((1 + 2β)η(1 − τ));
    Adam (``adam_beta1`` given, for λ_max(P⁻¹H)): (2 + 2β₁)/((1 − β₁)η).

    Example:
        >>> stability_threshold(0.1), round(stability_threshold(0.1, momentum=0.9), 9)
        (20.0, 38.0)
        >>> round(stability_threshold(0.01, adam_beta1=0.9), 6)
        3800.0

    Paper: Cohen, Kaur, Li, Kolter & Talwalkar, ICLR 2021 (arXiv 2103.00065); Cohen et al.,
    "Adaptive Gradient Methods at the Edge of Stability", 2022 (arXiv 2207.14484).
    """
    if not lr > 0:
        raise InvalidArgumentError(
            f"the learning rate must be positive to define a threshold, got {lr}"
        )
    if adam_beta1 is not None:
        return (2 + 2 * adam_beta1) / ((1 - adam_beta1) * lr)
    eff = lr * (1 - dampening) if momentum > 0 else lr
    if momentum == 0:
        return 2.0 / eff
    if nesterov:
        return (2 + 2 * momentum) / ((1 + 2 * momentum) * eff)
    return (2 + 2 * momentum) / eff


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> tuple[Tensor, float, float] | None:
    """Adam's diagonal preconditioner P (flat, over ``params``), its β₁ and lr; None before step 1.

    P = (1 − β₁ᵗ)·(sqrt(v_t / (1 − β₂ᵗ)) + ε), read from the optimizer's ``exp_avg_sq`` and
    ``step`` state (torch.optim.Adam / AdamW and optimizers with the same state keys).
    """
    group = optimizer_group(optimizer, params)
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    pieces = []
    for p in params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or "step" not in state:
            return None
        t = float(state["step"])
        v = state["exp_avg_sq"].detach()
        if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
            v = state["max_exp_avg_sq"].detach()
        pieces.append(((1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + eps)).reshape(-1))
    return torch.cat(pieces), float(beta1), float(group["lr"])


class Sharpness(EigenMonitor):
    """Monitor λ_max of the Hessian on a probe batch and its ratio to the stability threshold.

    Each check runs warm-started Lanczos on the Hessian of ``loss_fn`` over ``data``. The
    threshold comes from the optimizer's param group: ``lr`` and ``momentum``/``nesterov``/
    ``dampening`` for SGD-type optimizers (2/η, (2+2β)/η, ...). For optimizers with ``betas`` and
    an ``exp_avg_sq`` state (Adam, AdamW) it also reports the preconditioned sharpness λ_max(P⁻¹H)
    against (2 + 2β₁)/((1 − β₁)η). With ``trace=True`` it adds a Hutch++ estimate of tr(H).

    Args:
        model, loss_fn: the model and ``loss_fn(outputs, targets)`` (mean or sum reduction).
        data: the probe batch ``(inputs, targets)`` (Cohen et al. use up to 5,000 examples).
        params: the parameters (default: all trainable).
        k: number of top eigenvalues computed (the numbers report the largest; default 1).
        tol: Lanczos relative residual tolerance (default 1e-3).
        max_matvecs: HVP budget per eigen-solve (default: eigsh's).
        trace: also estimate tr(H) with ``trace_matvecs`` HVPs (default False).
        preconditioned: ``"auto"`` (when the optimizer has Adam state), ``True`` or ``False``.
        lr: override the learning rate read from the optimizer.
        warm_start: start each Lanczos run from the previous check's top eigenvector (default
            True; False restarts from a random vector every check, for comparison).
        generator: randomness of the first start vector and of the trace probes.
        every: check every ``every`` steps. name: prefix (default ``"sharpness"``).

    Numbers: ``value`` (λ_max), ``threshold``, ``ratio`` (= value/threshold; 1 at the edge),
    ``matvecs`` (HVPs this check), ``converged``; with preconditioning ``preconditioned``,
    ``preconditioned_threshold``, ``preconditioned_ratio``, ``preconditioned_matvecs``; with
    ``trace=True`` ``trace``, ``trace_ratio`` (= tr(H)·η/2) and ``trace_matvecs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlab.monitors import Sharpness, attach
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(32, 3, generator=g, dtype=torch.float64)
        >>> model = nn.Linear(3, 1).double()                 # MSE: H = 2 [X 1]ᵀ[X 1] / N
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> handle = attach(opt, Sharpness(model, nn.MSELoss(), (X, X[:, :1]), every=1))
        >>> values = handle.check_now()
        >>> Z = torch.cat([X, torch.ones(32, 1, dtype=torch.float64)], 1)
        >>> exact = float(torch.linalg.eigvalsh(2 * Z.T @ Z / 32)[-1])
        >>> abs(values["sharpness/value"] - exact) < 1e-6 * exact
        True
        >>> values["sharpness/threshold"]
        40.0

    Paper: Cohen et al., ICLR 2021 (arXiv 2103.00065); Cohen et al. 2022 (arXiv 2207.14484); Wu,
    Ma & E, "How SGD Selects the Global Minima in Over-parameterized Learning", NeurIPS 2018.
    """

    default_name = "sharpness"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | Callable[..., Tensor],
        data: tuple[Tensor, Tensor],
        *,
        preconditioned: bool | str = "auto",
        lr: float | None = None,
        trace: bool = False,
        trace_matvecs: int = 30,
        warm_start: bool = True,
        params: Sequence[Tensor] | None = None,
        every: int = 10,
        name: str | None = None,
        k: int = 1,
        tol: float = 1e-3,
        max_matvecs: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            data,
            k=k,
            tol=tol,
            max_matvecs=max_matvecs,
            generator=generator,
            params=params,
            every=every,
            name=name,
        )
        if preconditioned not in ("auto", True, False):
            raise InvalidArgumentError(
                f"preconditioned must be 'auto', True or False, got {preconditioned!r}"
            )
        self.with_trace, self.trace_matvecs = trace, trace_matvecs
        self.preconditioned, self.lr, self.warm_start = preconditioned, lr, warm_start
        self._v0: Tensor | None = None
        self._pv0: Tensor | None = None
        self.last_eigenvalues: Tensor | None = None

    def validate(self, optimizer: torch.optim.Optimizer) -> None:
        """Default checks; with ``preconditioned=True`` the optimizer must have Adam's ``betas``."""
        super().validate(optimizer)
        group = optimizer_group(optimizer, self.params)
        if self.lr is None and "lr" not in group:
            raise InvalidArgumentError(
                f"monitor {self.name!r}: the optimizer's param group has no 'lr'; pass lr=..."
            )
        if self.preconditioned is True and ("betas" not in group or "eps" not in group):
            raise InvalidArgumentError(
                f"monitor {self.name!r}: preconditioned=True needs an Adam-type optimizer (param "
                f"group with 'betas' and 'eps'), got {type(optimizer).__name__}; pass "
                "preconditioned='auto' or False"
            )

    def _eig(self, op: Any, v0: Tensor | None) -> tuple[Tensor, Tensor, int, bool]:
        res, used = self.top_eigenpairs(op, v0)
        return res.values, res.vectors[:, 0].detach(), used, res.converged

    def compute(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """λ_max, threshold, ratio (and the preconditioned / trace figures when enabled)."""
        assert self.counter is not None
        group = optimizer_group(optimizer, self.params)
        lr = float(self.lr if self.lr is not None else group["lr"])
        v0 = self._v0 if self.warm_start else None
        values, self._v0, used, converged = self._eig(self.counter, v0)
        self.last_eigenvalues = values
        lam = float(values[0])
        adaptive = "betas" in group and "eps" in group
        if lr == 0:  # a zero step (e.g. the end of a cosine schedule) is stable at any curvature
            thr = math.inf
        elif adaptive:
            thr = stability_threshold(lr)
        else:
            thr = stability_threshold(
                lr,
                momentum=float(group.get("momentum", 0.0) or 0.0),
                nesterov=bool(group.get("nesterov", False)),
                dampening=float(group.get("dampening", 0.0) or 0.0),
            )
        out: dict[str, float] = {
            "value": lam,
            "threshold": thr,
            "ratio": lam / thr,
            "matvecs": float(used),
            "converged": float(converged),
        }
        if self.preconditioned is True or (self.preconditioned == "auto" and adaptive):
            pre = adam_preconditioner(optimizer, self.params) if adaptive else None
            if pre is None:
                out["preconditioned"] = math.nan  # no second-moment state yet (before step 1)
            else:
                p, beta1, _ = pre
                scaled = ScaledOperator(self.counter, p.rsqrt())
                pv0 = self._pv0 if self.warm_start else None
                pvals, self._pv0, pused, _ = self._eig(scaled, pv0)
                pthr = math.inf if lr == 0 else stability_threshold(lr, adam_beta1=beta1)
                out["preconditioned"] = float(pvals[0])
                out["preconditioned_threshold"] = pthr
                out["preconditioned_ratio"] = float(pvals[0]) / pthr
                out["preconditioned_matvecs"] = float(pused)
        if self.with_trace:
            start = self.counter.num_matvecs
            est = trace(self.counter, num_matvecs=self.trace_matvecs, generator=self.generator)
            out["trace"] = float(est.value)
            out["trace_ratio"] = float(est.value) * lr / 2
            out["trace_matvecs"] = float(self._matvecs_since(start))
        return out
