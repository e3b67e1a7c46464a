"""Reusable scratch buffers for optimizer temporaries (not optimizer state).

Large temporaries freshly allocated every step cost page faults on CPU, so MFAC and FRUGAL write
their per-tensor temporaries (a d-sized IHVP, a sign buffer, an Adam denominator) into one buffer
per (device, dtype) that lives as long as the optimizer object.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["workspace"]


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
