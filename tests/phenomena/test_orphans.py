"""A killed ``curvlab dynamics --all`` leaves no worker process running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    alive = []
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if d.name.isdigit() and os.getsid(int(d.name)) == sid:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(int(d.name))
    return alive


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and sessions")
def test_sigkill_of_dynamics_all_leaves_no_worker(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "curvlab", "dynamics", "--all", "--quick", "--workers", "2"]
    proc = subprocess.Popen(
        [*cmd, "--no-progress", "--out", str(tmp_path)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        deadline = time.monotonic() + 300
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = [
                p
                for p in _session(proc.pid)
                if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            time.sleep(0.05)
        assert len(workers) == 2, "the two workers did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        deadline = time.monotonic() + 60
        while set(workers) & set(_session(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not set(workers) & set(_session(proc.pid)), "orphaned workers kept running"
    finally:
        for p in _session(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
