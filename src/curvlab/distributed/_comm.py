"""The collectives compressed communication needs, on torch.distributed or on simulated workers.

:class:`TorchComm` calls ``torch.distributed`` (gloo, NCCL); :class:`SimulatedWorld` runs the same
collectives between threads of one process, so that an algorithm's per-rank code runs unchanged on
``N`` simulated workers in a unit test. Both count the bytes a rank sends with the same cost model
(:func:`wire_bytes`); :func:`count_collectives` applies that model to any code that calls
``torch.distributed`` from Python (DDP's built-in hooks, PowerSGD).

Cost model (bytes one rank sends, bandwidth-optimal algorithms, ``W`` ranks, ``B`` input bytes):
``all_reduce`` 2(W-1)/W * B (ring: reduce-scatter + all-gather), ``all_gather`` (W-1) * B,
``all_to_all`` (W-1)/W * B (a rank keeps its own chunk).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.distributed._sync import require_process_group

__all__ = [
    "Comm",
    "SimulatedWorld",
    "TorchComm",
    "count_collectives",
    "resolve_comm",
    "run_ranks",
    "wire_bytes",
]

T = TypeVar("T")


def wire_bytes(op: str, nbytes: int, world: int) -> int:
    """Bytes one rank sends for collective ``op`` on ``nbytes`` input bytes over ``world`` ranks."""
    if op == "all_reduce":
        return 2 * (world - 1) * nbytes // world
    if op == "all_gather":
        return (world - 1) * nbytes
    return (world - 1) * nbytes // world  # all_to_all


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Comm(Protocol):
    """The collectives used here, with ``rank``, ``world`` and a ``bytes_sent`` counter."""

    rank: int
    world: int
    bytes_sent: int

    def all_reduce_sum(self, t: Tensor) -> None:
        """Sum ``t`` over ranks, in place."""

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t`` (same shape everywhere), in rank order."""

    def all_to_all(self, t: Tensor) -> Tensor:
        """Row ``j`` of the result is row ``rank`` of rank ``j``'s ``t`` (``t``: ``[world, ...]``)."""


class TorchComm:
    """:class:`Comm` over a ``torch.distributed`` process group (``None``: the world)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bytes_sent = 0

    def all_reduce_sum(self, t: Tensor) -> None:
        """Sum ``t`` over ranks, in place (``dist.all_reduce``)."""
        self.bytes_sent += wire_bytes("all_reduce", _nbytes(t), self.world)
        dist.all_reduce(t, group=self.group)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t`` in rank order (``dist.all_gather``)."""
        self.bytes_sent += wire_bytes("all_gather", _nbytes(t), self.world)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out

    def all_to_all(self, t: Tensor) -> Tensor:
        """Chunk exchange (``dist.all_to_all_single``; gloo and NCCL both have it)."""
        self.bytes_sent += wire_bytes("all_to_all", _nbytes(t), self.world)
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=self.group)
        return out


class _SimulatedRank:
    """One simulated worker's :class:`Comm`: a view of a :class:`SimulatedWorld`."""

    def __init__(self, world: SimulatedWorld, rank: int) -> None:
        self._world = world
        self.rank = rank
        self.world = world.size
        self.bytes_sent = 0

    def _exchange(self, t: Tensor) -> list[Tensor]:
        return self._world.exchange(self.rank, t)

    def all_reduce_sum(self, t: Tensor) -> None:
        """Sum ``t`` over ranks in rank order, in place."""
        self.bytes_sent += wire_bytes("all_reduce", _nbytes(t), self.world)
        parts = self._exchange(t.clone())
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        t.copy_(total)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t`` in rank order."""
        self.bytes_sent += wire_bytes("all_gather", _nbytes(t), self.world)
        return [p.clone() for p in self._exchange(t.clone())]

    def all_to_all(self, t: Tensor) -> Tensor:
        """Row ``j`` of the result is row ``rank`` of rank ``j``'s ``t``."""
        self.bytes_sent += wire_bytes("all_to_all", _nbytes(t), self.world)
        parts = self._exchange(t.clone())
        return torch.stack([p[self.rank] for p in parts])


class SimulatedWorld:
    """``size`` simulated workers in one process; :meth:`rank` gives each one's :class:`Comm`.

    Each worker runs in its own thread (see :func:`run_ranks`); a collective waits for all of
    them, exactly like a real one. Pass ``world.rank(r)`` as the ``process_group`` of
    :class:`~curvlab.distributed.OneBitAdam` or :class:`~curvlab.distributed.EControlState`.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: list[Tensor | None] = [None] * size
        self._barrier = threading.Barrier(size)

    def rank(self, r: int) -> _SimulatedRank:
        """The :class:`Comm` of simulated worker ``r``."""
        return _SimulatedRank(self, r)

    def exchange(self, rank: int, t: Tensor) -> list[Tensor]:
        """Deposit ``t`` for ``rank`` and return every rank's deposit (a barrier on both sides)."""
        self._slots[rank] = t
        self._barrier.wait()
        out = [s for s in self._slots if s is not None]
        self._barrier.wait()
        return out

    def abort(self) -> None:
        """Release every waiting worker (with ``BrokenBarrierError``) after one of them failed."""
        self._barrier.abort()


def run_ranks(world: SimulatedWorld, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(rank)`` for every simulated rank in its own thread; results in rank order.

    Raises:
        The first exception a worker raised (the others are released from their barrier).
    """
    results: list[Any] = [None] * world.size
    errors: list[BaseException] = []

    def target(r: int) -> None:
        try:
            results[r] = fn(r)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            world.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world.size)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL over promptly: workers wait on each other often
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), None)
        raise first if first is not None else errors[0]
    return results


def resolve_comm(process_group: Any, who: str) -> Comm:
    """The :class:`Comm` for ``process_group``: a simulated rank as is, else torch.distributed.

    Raises:
        DistributedError: ``torch.distributed`` is not initialised (and no simulated rank given).
    """
    if isinstance(process_group, _SimulatedRank):
        return process_group
    require_process_group(f"building {who}")
    return TorchComm(process_group)


@contextmanager
def count_collectives() -> Iterator[dict[str, int]]:
    """Count the bytes this rank sends through Python calls of ``torch.distributed`` collectives.

    Patches ``torch.distributed.all_reduce``, ``all_gather`` and ``all_to_all_single`` while the
    block runs and yields a dict whose ``"bytes"`` entry grows by :func:`wire_bytes` per call
    (DDP's default reducer runs in C++ and is not seen: register ``allreduce_hook`` to count it).
    """
    counter = {"bytes": 0, "calls": 0}
    originals = {
        name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_to_all_single")
    }

    def wrap(name: str, op: str, arg: int) -> Callable[..., Any]:
        fn = originals[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            t = args[arg]
            group = kwargs.get("group")
            counter["bytes"] += wire_bytes(op, _nbytes(t), dist.get_world_size(group))
            counter["calls"] += 1
            return fn(*args, **kwargs)

        return counted

    dist.all_reduce = wrap("all_reduce", "all_reduce", 0)  # type: ignore[assignment]
    dist.all_gather = wrap("all_gather", "all_gather", 1)  # type: ignore[assignment]
    dist.all_to_all_single = wrap("all_to_all_single", "all_to_all", 1)  # type: ignore[assignment]
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
