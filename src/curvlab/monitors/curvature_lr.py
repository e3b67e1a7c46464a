"""The learning rate the local quadratic model suggests along the gradient: η* = gᵀg / gᵀHg.

Minimising L(θ − η g) ≈ L − η gᵀg + ½η² gᵀHg over η gives η* = gᵀg / gᵀHg, the exact line search
of the local quadratic along the gradient (Granziol, Zohren & Roberts; the author's on-the-fly
learner in ``diegogranziol/rmt_damping_dl`` ``eigenthings/lr_sgd.py``). In a non-convex region
gᵀHg ≤ 0 and the quadratic has no minimum along g: the monitor reports NaN there (no guess).
"""

from __future__ import annotations

import math

import torch

from curvlab.monitors._curvature import HessianMonitor, optimizer_group

__all__ = ["CurvatureLR"]


class CurvatureLR(HessianMonitor):
    """Monitor η* = gᵀg / gᵀHg on the probe batch (one gradient and one HVP per check).

    Args:
        model, loss_fn, data: the model, loss and probe batch.
        params: the parameters (default: all trainable).
        every, name: as for every monitor (default name ``"curvature_lr"``).

    Numbers: ``lr`` (η*, NaN when gᵀHg ≤ 0), ``gHg``, ``gg``, ``lr_ratio`` (η* / the optimizer's lr),
    ``matvecs`` (1).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlab.monitors import CurvatureLR, attach
        >>> X = torch.eye(2, dtype=torch.float64) * torch.tensor([1.0, 3.0], dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> values = attach(opt, CurvatureLR(model, nn.MSELoss(reduction="sum"),
        ...                                  (X, torch.zeros(2, 1, dtype=torch.float64)))).check_now()
        >>> round(values["curvature_lr/lr"], 6)   # H = diag(2, 18), g = (2, 18): 328 / 5840
        0.056164

    Paper: Granziol, Zohren & Roberts, "Learning Rates as a Function of Batch Size", JMLR 2022
    (arXiv 2006.09092).
    """

    default_name = "curvature_lr"

    def compute(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """η* = gᵀg / gᵀHg and its ratio to the optimizer's learning rate."""
        assert self.counter is not None
        start = self.counter.num_matvecs
        _, g = self.operator.loss_and_gradient()
        hg = self.counter @ g
        ghg = float(g @ hg)
        gg = float(g @ g)
        lr_star = gg / ghg if ghg > 0 else math.nan
        current = optimizer_group(optimizer, self.params).get("lr")
        return {
            "lr": lr_star,
            "gHg": ghg,
            "gg": gg,
            "lr_ratio": lr_star / float(current) if current else math.nan,
            "matvecs": float(self._matvecs_since(start)),
        }
