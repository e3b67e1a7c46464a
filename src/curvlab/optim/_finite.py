"""A cheap pre-check in front of :func:`curvlab.optim._validation.check_finite_grads`.

``check_finite_grads`` reduces every gradient with an infinity norm, which on CPU is about 30 times
slower than a plain sum (1M float32 entries, one thread: ~7.7 ms against ~0.24 ms) and would cost
more than a whole FRUGAL step. A sum is non-finite whenever any entry is NaN or ±inf, so one sum per
gradient decides the common case; only when a sum is non-finite (a non-finite entry, or a finite
overflow) is ``check_finite_grads`` called, which applies the policy and names the culprit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab.optim._validation import check_finite_grads

__all__ = ["finite_grads_or_policy"]


def finite_grads_or_policy(param_groups: Sequence[dict[str, Any]], *, step: int) -> bool:
    """``True`` when every gradient is finite (or every group's policy is ``"ignore"``).

    Otherwise defers to ``check_finite_grads`` (raises ``NonFiniteError`` under ``"raise"``, returns
    ``False`` and counts the skip under ``"skip"``). One device-to-host read per dtype/device.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([1.0, 2.0])
        >>> finite_grads_or_policy([{"params": [p]}], step=1)
        True
    """
    if {g.get("on_nonfinite", "raise") for g in param_groups} == {"ignore"}:
        return True
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None:
                buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    if not buckets:
        return True
    flags = [torch.isfinite(torch.stack([g.sum() for g in gs])).all() for gs in buckets.values()]
    if bool(torch.stack([f.cpu() for f in flags]).all()):
        return True
    return check_finite_grads(param_groups, step=step)
