"""The Ray executor: the same records as the local pool, resume, the driver alone writes the store,
and clear errors (Ray missing, a cluster that cannot be reached) before anything is written.

One local Ray instance with 2 CPUs serves the whole file (Ray takes seconds to start). Its workers
run a setup hook that makes SQLite unusable in them, so any store access from a worker fails the
run: every run finishing is the proof that only the driver wrote the store.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from curvlab.bench.runner import run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import Suite, load_suite
from curvlab.cli import main
from curvlab.errors import ExecutorError, InvalidArgumentError

ray = pytest.importorskip("ray")

SUITE = """
name: tiny-ray
problems:
  quadratic-k1e2: {budget_steps: 20, eval_every: 5, target: 1.0e-2}
  breast-cancer-logreg: {budget_steps: 12, eval_every: 4, target: 0.3}
optimizers:
  - {label: adamw, optimizer: "torch.optim:AdamW", fixed: {weight_decay: 0.0}, defaults: {lr: 0.01}}
  - {label: sgd, optimizer: "torch.optim:SGD", defaults: {lr: 0.005}}
tracks:
  defaults: {seeds: 1}
monitors:
  - {name: sharpness, every: 5, problems: [quadratic-k1e2]}
"""

# The step-clock columns: everything but the seconds clock and bookkeeping (times, env, owner).
RUN_COLS = (
    "run_id",
    "status",
    "steps",
    "grad_evals",
    "hvp_evals",
    "final_metric",
    "final_loss",
    "ttt_steps",
    "ttt_grad_evals",
    "diverged_step",
    "error",
)
EVAL_COLS = ("run_id", "step", "grad_evals", "hvp_evals", "train_loss", "metrics")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    def no_sqlite_in_workers() -> None:  # nested: Ray ships it by value to its workers
        import sqlite3

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError("a Ray worker opened an SQLite database")

        sqlite3.connect = refuse  # type: ignore[assignment]

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": no_sqlite_in_workers},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    path = tmp_path_factory.mktemp("suite") / "tiny-ray.yaml"
    path.write_text(SUITE)
    return load_suite(str(path))


@pytest.fixture(scope="module")
def local_store(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite through the local process pool (the reference records)."""
    path = tmp_path_factory.mktemp("local") / "store.sqlite"
    res = run_suite(suite, path, workers=2, progress=False)
    assert (res.total, res.finished) == (4, 4)
    return path


def _rows(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as c:
        runs = c.execute(f"SELECT {', '.join(RUN_COLS)} FROM runs ORDER BY run_id").fetchall()
        evals = c.execute(f"SELECT {', '.join(EVAL_COLS)} FROM evals ORDER BY run_id, step")
        monitors = c.execute("SELECT key, step, name, value FROM monitors ORDER BY key, step, name")
        return runs, evals.fetchall(), monitors.fetchall()


def test_workers_cannot_open_sqlite(cluster: Any) -> None:
    """The guard of this file is live in the workers (else the next tests would prove nothing)."""

    @cluster.remote
    def touch(path: str) -> str:
        try:
            sqlite3.connect(path)
        except PermissionError as exc:
            return str(exc)
        return "opened"

    assert cluster.get(touch.remote(":memory:")) == "a Ray worker opened an SQLite database"


def test_ray_gives_the_local_pools_step_clock_records_bit_for_bit(
    cluster: Any, suite: Suite, local_store: Path, tmp_path: Path
) -> None:
    path = tmp_path / "ray.sqlite"
    res = run_suite(suite, path, executor="ray", progress=False)
    assert (res.total, res.finished, res.failed) == (4, 4, 0)  # no worker touched the store
    runs, evals, monitors = _rows(path)
    assert (runs, evals, monitors) == _rows(local_store)
    assert len(evals) == 2 * (1 + 30 // 5) + 2 * (1 + 18 // 4 + 1)  # budget factor 1.5
    assert len({m[0] for m in monitors}) == 2  # sharpness on both quadratic runs
    st = Store(path, readonly=True)
    try:
        env = st.runs()[0]["env"]
        assert env["executor"] == "ray" and env["threads"] == 1 and "host_end" in env
        assert st.integrity_check() == "ok"
    finally:
        st.close()


def test_resume_runs_only_the_unfinished(
    cluster: Any, suite: Suite, local_store: Path, tmp_path: Path
) -> None:
    path = tmp_path / "resume.sqlite"
    shutil.copy(local_store, path)
    with sqlite3.connect(path) as c:
        ids = [r[0] for r in c.execute("SELECT run_id FROM runs ORDER BY run_id")]
        c.execute("UPDATE runs SET status='failed' WHERE run_id=?", (ids[0],))
        c.execute("UPDATE runs SET status='running', owner=NULL WHERE run_id=?", (ids[1],))
    res = run_suite(suite, path, executor="ray", workers=2, progress=False)
    assert (res.total, res.already_done, res.finished, res.failed) == (4, 2, 2, 0)
    with sqlite3.connect(path) as c:
        attempts = dict(c.execute("SELECT run_id, attempt FROM runs").fetchall())
    assert attempts == {ids[0]: 2, ids[1]: 2, ids[2]: 1, ids[3]: 1}
    assert _rows(path) == _rows(local_store)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_address_names_it_and_writes_nothing(
    cluster: Any, suite: Suite, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    path = tmp_path / "store.sqlite"
    with pytest.raises(ExecutorError, match=f"cannot reach the Ray cluster at {address}"):
        run_suite(suite, path, executor="ray", address=address, progress=False)
    assert not path.exists()
    with pytest.raises(InvalidArgumentError, match="is not HOST:PORT"):
        run_suite(suite, path, executor="ray", address="headnode", progress=False)
    assert not path.exists()


def test_ray_not_installed(suite: Suite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    path = tmp_path / "store.sqlite"
    with pytest.raises(ExecutorError, match=r"pip install curvlab\[ray\]"):
        run_suite(suite, path, executor="ray", progress=False)
    assert not path.exists()


def test_cli_errors_are_one_line_exit_2(
    cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE)
    store = tmp_path / "store.sqlite"
    address = f"127.0.0.1:{_closed_port()}"
    common = ["--suite", str(suite), "--store", str(store), "--no-progress"]
    for command, extra, fragment in (
        ("run", ["--executor", "ray", "--address", address], f"Ray cluster at {address}"),
        ("calibrate", ["--executor", "ray", "--address", address], f"Ray cluster at {address}"),
        ("run", ["--address", address], "use it with executor='ray'"),
    ):
        assert main(["bench", command, *common, *extra]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not store.exists()


def test_bad_executor_options(suite: Suite, tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    with pytest.raises(InvalidArgumentError, match="exclude each other"):
        run_suite(suite, path, executor="ray", workers=0)
    from curvlab.errors import UnknownOptionError

    with pytest.raises(UnknownOptionError, match="executor must be one of local, ray"):
        run_suite(suite, path, executor="dask")
    assert not path.exists()


def test_a_task_that_raises_fails_its_run_once_with_the_error(
    cluster: Any, suite: Suite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import curvlab.bench.ray_executor as rx

    def broken(spec_dict: dict[str, Any], attempt: int, monitors: Any) -> Iterator[Any]:
        raise OSError("no such device")
        yield  # a generator, as the real task

    monkeypatch.setattr(rx, "ray_task", broken)
    path = tmp_path / "store.sqlite"
    res = run_suite(suite, path, executor="ray", progress=False, log=lambda m: None)
    assert (res.total, res.failed) == (4, 4)
    st = Store(path, readonly=True)
    try:
        runs = st.runs()
        assert {r["attempt"] for r in runs} == {1}  # not retried: it raised, it was not lost
        assert all("no such device" in r["error"] for r in runs)
    finally:
        st.close()
