"""What keeps ranks in lockstep: the process-group check, a checksum of what must agree, and
one all-reduce of a list of tensors.

Curvature over data-parallel ranks is only right when every rank runs the same computation on
its own shard: the same parameters, the same settings, the same random probes. A rank that
disagrees does not fail by itself; it silently mixes two problems. :func:`check_same_on_ranks`
turns that into an error at construction, from one all-reduce of a few 56-bit digests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.errors import DistributedError

__all__ = [
    "all_reduce_like",
    "check_same_on_ranks",
    "digest",
    "launched_world_size",
    "require_process_group",
]


def launched_world_size() -> int:
    """The world size a launcher (``torchrun``) announced in ``WORLD_SIZE``; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def require_process_group(who: str) -> None:
    """Raise :class:`DistributedError` unless ``torch.distributed`` is initialised.

    Args:
        who: what needs the process group, as the message names it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            f"torch.distributed is not initialised; call torch.distributed.init_process_group "
            f"(or run under torchrun) before {who}"
        )


def digest(parts: Iterable[Tensor | bytes | str]) -> int:
    """A 56-bit digest of tensors (their exact bytes, shapes and dtypes), bytes and strings."""
    h = hashlib.blake2b(digest_size=7)
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(part.encode() if isinstance(part, str) else part)
    return int.from_bytes(h.digest(), "little")


def check_same_on_ranks(items: Mapping[str, int], group: Any = None) -> None:
    """Raise :class:`DistributedError` if any digest in ``items`` differs between ranks.

    One ``all_reduce(MAX)`` of ``[d, -d]`` gives every rank the largest and the smallest value of
    each digest; they differ exactly when some rank disagrees. Every rank raises the same error.

    Args:
        items: what must agree (a phrase such as ``"the model's parameters"``) -> its digest.
        group: the process group (default: the world).
    """
    values = torch.tensor(list(items.values()), dtype=torch.int64)
    both = torch.cat([values, -values])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = len(values)
    differ = [name for k, name in enumerate(items) if int(both[k]) != -int(both[n + k])]
    if differ:
        raise DistributedError(
            f"the ranks disagree on {' and '.join(differ)}: every rank must build the same "
            "model (same initialisation or a broadcast from rank 0) and use the same settings and "
            "seed; only the data may differ (each rank's shard)"
        )


def all_reduce_like(
    tensors: Sequence[Tensor | None], like: Sequence[Tensor], group: Any = None, *, mean: bool
) -> list[Tensor | None]:
    """Sum (or average) ``tensors`` over ranks in one ``all_reduce`` per dtype and device.

    A ``None`` counts as zeros shaped like the matching entry of ``like``; an entry that is
    ``None`` on every rank stays ``None`` (a presence count travels with the values).

    Args:
        tensors: this rank's tensors (or ``None``).
        like: one tensor per entry giving shape, dtype and device.
        group: the process group (default: the world).
        mean: divide by the world size (an average) instead of summing.

    Returns:
        The reduced tensors, new (the inputs are not modified).
    """
    world = dist.get_world_size(group)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, ref in enumerate(like):
        buckets.setdefault((ref.dtype, ref.device), []).append(i)
    out: list[Tensor | None] = [None] * len(like)
    for (dtype, device), index in buckets.items():
        pieces = [
            torch.zeros(like[i].numel(), dtype=dtype, device=device)
            if tensors[i] is None
            else tensors[i].detach().reshape(-1).to(dtype)  # type: ignore[union-attr]
            for i in index
        ]
        present = torch.tensor([t is not None for t in (tensors[i] for i in index)])
        flat = torch.cat([*pieces, present.to(dtype=dtype, device=device)])
        dist.all_reduce(flat, group=group)
        if mean:
            flat[: -len(index)].div_(world)
        counts = flat[-len(index) :].tolist()
        offset = 0
        for i, count in zip(index, counts):
            n = like[i].numel()
            if count > 0:
                out[i] = flat[offset : offset + n].view_as(like[i])
            offset += n
    return out
