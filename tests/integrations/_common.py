"""Shared pieces of the integration tests: the optimizers, the recorder, the closure reference."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.optim import AdaHessian, Sophia
from curvlab.optim._validation import steps_taken

#: refresh period of every case; the runs take STEPS steps, so refreshes are at 1, 3, 5
K = 2
STEPS = 5
REFRESH_STEPS = [1, 3, 5]

#: name -> optimizer factory over params: SophiaG (GNB), SophiaH (Hutchinson), AdaHessian
OPTIMIZERS: dict[str, Callable[[Iterable[Tensor]], torch.optim.Optimizer]] = {
    "SophiaG": lambda ps: Sophia(ps, lr=0.02, rho=0.05, update_period=K, seed=7),
    "SophiaH": lambda ps: Sophia(
        ps, lr=0.02, rho=0.05, update_period=K, estimator="hutchinson", seed=7
    ),
    "AdaHessian": lambda ps: AdaHessian(ps, lr=0.05, update_period=K, seed=7),
}


def curvature_state(opt: torch.optim.Optimizer) -> list[Tensor]:
    """The curvature EMA of every parameter (Sophia's ``hessian``, AdaHessian's ``v``)."""
    key = "hessian" if isinstance(opt, Sophia) else "exp_hessian_diag_sq"
    return [st[key].clone() for st in opt.state.values()]


class Recorder:
    """Records, through the optimizer's hooks, the parameters after each step and the steps
    whose curvature was estimated."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.params: list[Tensor] = []
        self.refreshes: list[int] = []
        self.curvature_after_first: float | None = None
        self._opt = opt
        opt.register_step_post_hook(self._after_step)
        estimate = opt.estimate_curvature  # type: ignore[attr-defined]

        def spy(*args: Any, **kwargs: Any) -> None:
            self.refreshes.append(steps_taken(opt) + 1)
            estimate(*args, **kwargs)

        opt.estimate_curvature = spy  # type: ignore[attr-defined]

    def _after_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        flat = torch.cat([p.detach().reshape(-1) for g in opt.param_groups for p in g["params"]])
        self.params.append(flat.clone())
        if self.curvature_after_first is None:
            self.curvature_after_first = float(sum(c.abs().sum() for c in curvature_state(opt)))


def closure_trajectory(
    model: nn.Module, name: str, batches: list[Any], forward: Callable[[nn.Module, Any], Any]
) -> list[Tensor]:
    """Parameters after each step of the plain closure-contract loop (the reference).

    ``forward(model, batch) -> (loss, logits)``.
    """
    opt = OPTIMIZERS[name](model.parameters())
    out = []
    for batch in batches:
        opt.step(lambda b=batch: forward(model, b))
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    return out


def assert_same_trajectory(got: list[Tensor], want: list[Tensor], atol: float) -> float:
    """Assert equal parameter trajectories; return the largest difference seen."""
    assert len(got) == len(want)
    worst = max(float((a - b).abs().max()) for a, b in zip(got, want))
    assert worst <= atol, f"trajectories differ by {worst:.3g} > {atol:.1g}"
    return worst
