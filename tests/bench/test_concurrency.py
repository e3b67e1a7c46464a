"""Several runners on one store, and reruns: each run executed once, results bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from curvlab.bench.runner import run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import parse_suite

SRC = Path(__file__).resolve().parents[2] / "src"

RUNNER = """
import sys, time
from pathlib import Path
from curvlab.bench.runner import run_suite
from curvlab.bench.suites import load_suite
if __name__ == "__main__":
    suite, store, me, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    s = load_suite(suite)
    Path(store + f".ready{me}").touch()
    deadline = time.monotonic() + 300
    while not Path(store + ".go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    r = run_suite(s, store, workers=int(sys.argv[5]), progress=False)
    print("RESULT", r.finished, r.diverged, r.failed, r.taken, r.already_done)
"""


def test_runners_sharing_a_store_execute_each_run_once(tmp_path: Path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "name": "shared",
                "problems": {
                    "quadratic-k1e2": {"budget_steps": 150, "eval_every": 10, "target": 1e-2}
                },
                "optimizers": ["torch-sgd-momentum", "torch-adamw"],
                "tracks": {"defaults": {"seeds": 3}, "tuned": {"trials": 2, "studies": 1}},
            }
        )
    )
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    store = tmp_path / "store.sqlite"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    n = 3
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(suite), str(store), str(i), str(n), w],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, w in zip(range(n), ("0", "0", "1"))
    ]
    try:
        deadline = time.monotonic() + 300
        while not all(Path(f"{store}.ready{i}").exists() for i in range(n)):
            assert time.monotonic() < deadline, "the runners did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        Path(f"{store}.go").touch()  # all at once, on an empty store
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    counts = [list(map(int, o.split("RESULT")[1].split())) for o, _ in outs]
    runs = Store(store).runs()
    assert len(runs) == 10
    assert {r["status"] for r in runs} == {"finished"}
    assert [r["attempt"] for r in runs] == [1] * 10  # each run claimed, so executed, once
    assert sum(c[0] for c in counts) == 10  # finished by exactly one runner each
    assert all(c[0] + c[3] + c[4] == 10 for c in counts)  # the others left it to its owner
    for r in runs:
        steps = [e["step"] for e in Store(store).evals(r["run_id"])]
        assert steps == sorted({*range(0, r["budget_steps"], 10), r["budget_steps"]})


def _step_clock_rows(store: Path) -> list[tuple]:
    st = Store(store)
    return [
        (e["run_id"], e["step"], e["grad_evals"], e["hvp_evals"], e["train_loss"], e["metrics"])
        for e in st.evals()
    ]


def test_rerun_into_a_new_store_is_bit_identical(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    doc = tiny(
        problems={"quadratic-k1e2": {"budget_steps": 12, "eval_every": 4, "target": 1e-2}},
        optimizers=["sophiah", "adahessian", "adopt", "dog", "torch-sgd-momentum"],
        tracks={"defaults": {"seeds": 2}, "tuned": {"trials": 2, "studies": 1}},
    )
    first, second = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    assert run_suite(parse_suite(doc), first, workers=0, progress=False).failed == 0
    # the rerun in a worker process: the results do not depend on the process or the order
    assert run_suite(parse_suite(doc), second, workers=1, progress=False).failed == 0
    rows = _step_clock_rows(first)
    assert len(rows) == 5 * (2 * 6 + 2 * 4)  # defaults: 18 steps, tuned: 12; every 4
    assert rows == _step_clock_rows(second)
