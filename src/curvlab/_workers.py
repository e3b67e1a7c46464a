"""Worker processes that never outlive the process that started them (benchmark and dynamics pools)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import torch

__all__ = ["die_with_parent", "one_thread_worker"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make this process die with ``parent_pid``, whatever it is doing.

    On Linux the kernel sends SIGKILL when the parent exits (``prctl(PR_SET_PDEATHSIG)``); on every
    platform a daemon thread exits the process within a second of the parent being gone (the
    check also covers a parent that died before the ``prctl``).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(3)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(3)  # orphaned: the parent records what is left for its next invocation

    threading.Thread(target=watch, name="curvlab-parent-watch", daemon=True).start()


def one_thread_worker(parent_pid: int) -> None:
    """Pool initializer: die with the parent, leave Ctrl-C to it, run torch on one thread."""
    die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group; the parent alone handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
