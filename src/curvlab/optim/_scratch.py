"""Reusable scratch buffers for optimizer temporaries (not optimizer state).

Large temporaries freshly allocated every step cost page faults on CPU, so MFAC and FRUGAL write
their per-tensor temporaries (a d-sized IHVP, a sign buffer, an Adam denominator) into one buffer
per (device, dtype) that lives as long as the optimizer object.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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


#: elements per block of the CPU blocked fast paths (Sophia, AdaHessian: two float32 scratch rows
#: are 2 MiB); larger blocks mean fewer Python-level calls, which dominated below 2^17 in
#: measurements on a 2-core CPU
BLOCK = 1 << 18
#: tensors smaller than this take the ``_foreach`` route: their temporaries come from the heap and
#: cost little, while larger ones are fresh pages to fault in on every step (measured on CPU)
BLOCK_MIN = 1 << 17


def workspace_rows(
    owner: object | None, rows: int, n: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``rows`` scratch rows of ``n`` entries, a view of :func:`workspace`'s buffer of ``owner``.

    With ``owner=None`` (a functional call without an optimizer) a fresh tensor is returned.

    Example:
        >>> class Holder: ...
        >>> workspace_rows(Holder(), 2, 5, torch.float32, torch.device("cpu")).shape
        torch.Size([2, 5])
    """
    if owner is None:
        return torch.empty((rows, n), dtype=dtype, device=device)
    return workspace(owner, torch.empty((), dtype=dtype, device=device).expand(rows, n))


def cpu_blocks(
    tensor_lists: Sequence[list[Tensor]],
) -> tuple[list[tuple[Tensor, ...]], list[list[Tensor]], int]:
    """Split per-parameter tensor lists between the CPU blocked fast path and the ``_foreach`` one.

    On CPU, allocating and first-touching full-size temporaries, and every extra pass over memory,
    cost more than the arithmetic of an element-wise update; the blocked path runs the whole update
    on one cache-sized block at a time through :func:`workspace_rows`. A parameter takes it when it
    has at least :data:`BLOCK_MIN` entries and all its tensors (one per list, same index) are
    contiguous CPU tensors.

    Args:
        tensor_lists: equally long lists, the first one the parameters (e.g. params, grads, state).

    Returns:
        ``(blocked, rest, size)``: for each blocked parameter the tuple of its tensors flattened
        (views); the other tensors, as lists in the input order; the block size
        ``min(BLOCK, largest blocked numel)`` (0 when nothing is blocked).
    """
    firsts = tensor_lists[0]
    take = [
        i
        for i, p in enumerate(firsts)
        if p.numel() >= BLOCK_MIN
        and all(ts[i].device.type == "cpu" and ts[i].is_contiguous() for ts in tensor_lists)
    ]
    if not take:
        return [], [list(ts) for ts in tensor_lists], 0
    chosen = set(take)
    blocked = [tuple(ts[i].view(-1) for ts in tensor_lists) for i in take]
    rest = [[t for i, t in enumerate(ts) if i not in chosen] for ts in tensor_lists]
    return blocked, rest, min(BLOCK, max(firsts[i].numel() for i in take))


def block_ranges(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``size`` entries covering ``range(n)``.

    Example:
        >>> list(block_ranges(5, 2))
        [(0, 2), (2, 4), (4, 5)]
    """
    for start in range(0, n, size):
        yield start, min(n, start + size)
