"""Running a test's worker on two gloo processes (shared by the distributed tests)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

needs_gloo = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo"
)


def run_two_ranks(worker: Callable[[int, int, str, str], None], tmp_path: Path) -> None:
    """``worker(rank, 2, init_file, out_dir)`` on two forked processes (a file:// rendezvous)."""
    mp.start_processes(
        worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
