"""kill -9 of the runner or of a worker mid-suite: the store stays sound and the suite resumes,
and no worker outlives its runner, in any phase.

Every wait polls the store or /proc against a generous deadline (a loaded machine is slow), never
a fixed sleep."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curvlab.bench.runner import run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import load_suite

SRC = Path(__file__).resolve().parents[2] / "src"

SUITE = """
name: crash
problems:
  quadratic-k1e2: {budget_steps: 1500, eval_every: 5, target: 1.0e-2}
optimizers:
  - {label: sgd, optimizer: "torch.optim:SGD", defaults: {lr: 0.5}, search: {lr: {low: 0.01, high:
  1.0}}}
tracks:
  defaults: {seeds: 3}
  tuned: {trials: 1, studies: 1}
"""

SCRIPT = """
import sys
from curvlab.bench.runner import run_suite
from curvlab.bench.suites import load_suite
if __name__ == "__main__":
    r = run_suite(
        load_suite(sys.argv[1]),
        sys.argv[2],
        workers=int(sys.argv[3]),
        progress=False,
        executor=sys.argv[4],
    )
    print("RESULT", r.finished, r.diverged, r.failed)
"""


def _start(
    tmp_path: Path, workers: int = 1, executor: str = "local"
) -> tuple[subprocess.Popen, Path, Path]:
    suite = tmp_path / "crash.yaml"
    suite.write_text(SUITE)
    script = tmp_path / "runner.py"
    script.write_text(SCRIPT)
    store = tmp_path / "store.sqlite"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(suite), str(store), str(workers), executor],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return proc, suite, store


def _wait_for(store: Path, cond: str, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if store.exists():
            try:
                with sqlite3.connect(store, timeout=5) as c:
                    if c.execute(cond).fetchone()[0]:
                        return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {cond}")


def _group_alive(pgid: int) -> list[int]:
    """The live processes of the runner's session (its pool workers share its process group; Ray's
    workers make groups of their own inside the session)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (
                    os.getsid(int(d.name)) == pgid
                    and "Z" not in (d / "stat").read_text().split()[2]
                ):
                    pids.append(int(d.name))
            except (OSError, IndexError):
                pass
    return pids


def _kill_all(sid: int) -> None:
    for pid in _group_alive(sid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _is_worker(pid: int, runner: int) -> bool:
    """A pool worker: not the runner, the fork server or the resource tracker (no children)."""
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"resource_tracker" in cmd:
        return False
    children = [
        d for d in Path("/proc").iterdir() if d.name.isdigit() and _ppid(int(d.name)) == pid
    ]
    return pid != runner and not children


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _assert_all_gone(pgid: int, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while _group_alive(pgid) and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    assert _group_alive(pgid) == [], "orphaned workers kept running"


def _running_workers(runner: int, executor: str) -> list[int]:
    """The runner's worker processes (local pool) or its Ray workers running a task (Ray)."""
    mark = b"spawn_main" if executor == "local" else b"ray::ray_task"
    out = []
    for p in _group_alive(runner):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if p != runner and mark in cmd and b"resource_tracker" not in cmd:
            out.append(p)
    return out


def _check_resume(suite: Path, store: Path) -> None:
    st = Store(store)
    assert st.integrity_check() == "ok"
    res = run_suite(load_suite(str(suite)), store, workers=0, progress=False)
    assert res.failed == 0
    runs = st.runs()
    assert len(runs) == 4 and {r["status"] for r in runs} == {"finished"}
    for r in runs:
        assert [e["step"] for e in st.evals(r["run_id"])] == sorted(
            {*range(0, r["budget_steps"], 5), r["budget_steps"]}
        )
    assert st.integrity_check() == "ok"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and process groups")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigkill_of_the_runner_mid_run(tmp_path: Path, executor: str) -> None:
    if executor == "ray":
        pytest.importorskip("ray")
    proc, suite, store = _start(tmp_path, executor=executor)
    try:
        _wait_for(store, "SELECT COUNT(*) FROM runs WHERE status='finished'")
        _wait_for(
            store,
            "SELECT COUNT(*) FROM evals e JOIN runs r USING (run_id) WHERE r.status='running' AND "
            "e.step > 0",
        )
        assert _running_workers(proc.pid, executor)  # the group holds them: checked below
        os.kill(proc.pid, signal.SIGKILL)  # the runner only: its workers are orphaned mid-run
        proc.wait(60)
        _assert_all_gone(proc.pid)
    finally:
        _kill_all(proc.pid)
    with sqlite3.connect(store) as c:
        done_before = {
            r[0]: r[1]
            for r in c.execute("SELECT run_id, attempt FROM runs WHERE status='finished'")
        }
        assert c.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0] >= 1
    _check_resume(suite, store)
    st = Store(store)
    for rid, attempt in done_before.items():  # finished runs were not redone
        assert st.runs(run_id=rid)[0]["attempt"] == attempt


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and process groups")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigkill_of_a_worker_mid_run(tmp_path: Path, executor: str) -> None:
    if executor == "ray":
        pytest.importorskip("ray")
    proc, suite, store = _start(tmp_path, executor=executor)
    try:
        _wait_for(
            store,
            "SELECT COUNT(*) FROM evals e JOIN runs r USING (run_id) WHERE r.status='running' AND "
            "e.step > 0",
        )
        workers = _running_workers(proc.pid, executor)
        assert workers
        os.kill(workers[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_all(proc.pid)
    assert proc.returncode == 0, err
    assert ("a worker process died" if executor == "local" else "a Ray task was lost") in err
    assert "RESULT 4 0 0" in out
    _check_resume(suite, store)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and process groups")
def test_sigkill_of_the_runner_while_its_pool_starts(tmp_path: Path) -> None:
    proc, _, _ = _start(tmp_path, workers=2)
    try:
        t0 = time.monotonic()
        workers: list[int] = []
        while not workers and time.monotonic() - t0 < 300:
            workers = [
                p
                for p in _group_alive(proc.pid)
                if _ppid(p) == proc.pid and b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            time.sleep(0.01)
        assert workers, "no worker started"
        os.kill(proc.pid, signal.SIGKILL)  # the workers are still importing torch
        proc.wait(60)
        _assert_all_gone(proc.pid)
    finally:
        _kill_all(proc.pid)
