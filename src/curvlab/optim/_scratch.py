"""Reusable scratch buffers for optimizer temporaries (not optimizer state): the one mechanism.

Large temporaries freshly allocated every step cost page faults on CPU, so the optimizers write
their temporaries (ADOPT's normalised gradient, DoG's ``x - x0``, M-FAC's d-sized IHVP, FRUGAL's
sign buffer and Adam denominator) into one flat buffer per (device, dtype) kept in the optimizer's
``__dict__``: :func:`workspace` gives one view shaped like a tensor, :func:`workspace_views` views
for a list of tensors (a foreach chunk), :func:`chunks` splits a long list into chunks of bounded
total size. ``state_dict``, ``copy.deepcopy`` and pickling drop the buffer (they keep only
``defaults``, ``state`` and ``param_groups``); it is rebuilt on the next step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunks", "workspace", "workspace_views"]


def chunks(numels: list[int], cap: int = 1 << 22) -> list[list[int]]:
    """Consecutive index groups, each fitting a scratch of max(largest tensor, min(total, cap)).

    Small models run in one group (fewest foreach calls); large ones need a scratch no bigger
    than ``cap`` elements or their largest tensor.

    Example:
        >>> chunks([3, 3, 3], cap=6)
        [[0, 1], [2]]
    """
    limit = max(max(numels), min(sum(numels), cap))
    groups: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(numels):
        if groups[-1] and total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def _buffer(optimizer: object, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
    """The flat buffer of ``(device, dtype)``, grown to at least ``numel`` elements."""
    bufs: dict[tuple[torch.device, torch.dtype], Tensor]
    bufs = optimizer.__dict__.setdefault("_workspace", {})
    buf = bufs.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        bufs[(device, dtype)] = buf
        views = optimizer.__dict__.get("_workspace_views", {})
        for k in [k for k in views if k[:2] == (device, dtype)]:  # views of the old buffer
            del views[k]
    return buf


def workspace_views(optimizer: object, like: list[Tensor]) -> list[Tensor]:
    """Consecutive views of the scratch buffer, one shaped like each tensor of ``like``.

    All tensors of ``like`` share one device and dtype. The views are valid until the next call
    of :func:`workspace` or :func:`workspace_views` on the same optimizer.

    Example:
        >>> class Holder: ...
        >>> [v.shape for v in workspace_views(Holder(), [torch.zeros(2), torch.zeros(1, 3)])]
        [torch.Size([2]), torch.Size([1, 3])]
    """
    buf = _buffer(optimizer, like[0].device, like[0].dtype, sum(t.numel() for t in like))
    views, off = [], 0
    for t in like:
        views.append(buf[off : off + t.numel()].view(t.shape))
        off += t.numel()
    return views


def workspace(optimizer: object, like: Tensor) -> Tensor:
    """A reusable scratch tensor shaped like ``like`` (same dtype and device); not optimizer state.

    Large temporaries freshly allocated every step cost page faults on CPU (a 2 MB ``g.sign()``
    takes ~4x longer than ``torch.sign(g, out=buf)`` into a warm buffer), so optimizers write their
    per-tensor temporaries here. One flat buffer per (device, dtype), as large as the largest
    request (shared with :func:`workspace_views`), kept in the optimizer's ``__dict__`` (dropped by
    pickling and ``copy.deepcopy``, which keep only ``defaults``, ``state`` and ``param_groups``).
    Callers must finish with one view before asking for the next.

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
    view = _buffer(optimizer, like.device, like.dtype, like.numel())[: like.numel()].view(
        like.shape
    )
    views[key] = view
    return view
