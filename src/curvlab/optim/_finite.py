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

__all__ = ["finite_grads_or_policy", "workspace"]


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


def workspace(optimizer: object, like: Tensor) -> Tensor:
    """A reusable scratch tensor shaped like ``like`` (same dtype and device); not optimizer state.

    Large temporaries freshly allocated every step cost page faults on CPU (a 2 MB ``g.sign()``
    takes ~4x longer than ``torch.sign(g, out=buf)`` into a warm buffer), so optimizers write their
    per-tensor temporaries here. One flat buffer per (device, dtype), as large as the largest
    request, kept in the optimizer's ``__dict__`` (dropped by pickling and ``copy.deepcopy``, which
    keep only ``defaults``, ``state`` and ``param_groups``). Callers must finish with one view
    before asking for the next.

    Example:
        >>> class Holder: ...
        >>> h = Holder()
        >>> workspace(h, torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    views: dict[tuple[torch.device, torch.dtype, torch.Size], Tensor]
    views = optimizer.__dict__.setdefault("_workspace_views", {})
    key = (like.device, like.dtype, like.shape)
    view = views.get(key)
    if view is not None:
        return view
    bufs: dict[tuple[torch.device, torch.dtype], Tensor]
    bufs = optimizer.__dict__.setdefault("_workspace", {})
    buf = bufs.get(key[:2])
    if buf is None or buf.numel() < like.numel():
        buf = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        bufs[key[:2]] = buf
        for k in [k for k in views if k[:2] == key[:2]]:  # views of the old buffer
            del views[k]
    view = buf[: like.numel()].view(like.shape)
    views[key] = view
    return view
