"""Reusable scratch buffers for optimizer temporaries (not optimizer state): the one mechanism.

Large temporaries freshly allocated every step cost page faults on CPU, so the optimizers write
their temporaries (ADOPT's normalised gradient, DoG's ``x - x0``, M-FAC's d-sized IHVP, FRUGAL's
sign buffer and Adam denominator) into one flat buffer per (device, dtype) kept in the optimizer's
``__dict__``: :func:`workspace` gives one view shaped like a tensor, :func:`workspace_views` views
for a list of tensors (a foreach chunk), :func:`chunks` splits a long list into chunks of bounded
total size; :func:`bucket_rows` groups the per-parameter tensors of a multi-tensor path.
``state_dict``, ``copy.deepcopy`` and pickling drop the buffer (they keep only ``defaults``,
``state`` and ``param_groups``); it is rebuilt on the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["bucket_rows", "chunks", "workspace", "workspace_views"]

K = TypeVar("K", bound=Hashable)


def bucket_rows(
    rows: Iterable[Sequence[Tensor]], key: Callable[[Sequence[Tensor]], K]
) -> dict[K, list[list[Tensor]]]:
    """Group per-parameter rows (param, grad, state tensors, ...) by ``key(row)``.

    Each bucket holds the columns of its rows, in order, as lists: the argument lists of the
    ``torch._foreach_*`` calls of one (device, dtype, ...) bucket.

    Example:
        >>> a, b, c = torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.ones(1)
        >>> buckets = bucket_rows([(a, c), (b, c), (c, a)], key=lambda row: row[0].dtype)
        >>> [len(cols[0]) for cols in buckets.values()]
        [2, 1]
    """
    buckets: dict[K, list[list[Tensor]]] = {}
    for row in rows:
        k = key(row)
        bucket = buckets.get(k)
        if bucket is None:
            bucket = buckets[k] = [[] for _ in row]
        for column, t in zip(bucket, row):
            column.append(t)
    return buckets


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
