"""Running a test's worker on two gloo processes, and the small problem the distributed tests
shard (shared by the distributed tests)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

needs_gloo = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo"
)


def run_two_ranks(worker: Callable[[int, int, str, str], None], tmp_path: Path) -> None:
    """``worker(rank, 2, init_file, out_dir)`` on two processes (a file:// rendezvous).

    They start from a forkserver: forking the threaded pytest worker itself can deadlock a child.
    """
    mp.start_processes(
        worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="forkserver"
    )


def _collect(rank: int, world: int, init_file: str, out_dir: str, fn: Callable[[int], Any]):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def two_rank_results(fn: Callable[[int], Any], tmp_path: Path) -> list[Any]:
    """``[fn(0), fn(1)]``, each run on its rank of an initialised 2-rank gloo world."""
    mp.start_processes(
        _collect,
        args=(2, str(tmp_path / "init"), str(tmp_path), fn),
        nprocs=2,
        start_method="forkserver",
    )
    return [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    """13 examples, 4 features, 3 classes; targets 1, 2 and 9 ignored (uneven over 8 | 5)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    y[[1, 2, 9]] = -100
    return x, y


def tiny_loss() -> nn.Module:
    """Cross-entropy with class weights (the denominators differ between shards)."""
    return nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))


def tiny_model() -> nn.Module:
    """A float64 tanh MLP 4-5-3, the same on every rank (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
