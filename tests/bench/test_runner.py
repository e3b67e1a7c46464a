"""The runner: one script for all optimizers, clocks, closure contract, divergence, resume."""

from __future__ import annotations

import itertools
import math
import socket
import sqlite3
import sys
import types
from pathlib import Path

import pytest
import torch

from curvlab.bench.optimizers import CostModel, resolve_optimizer
from curvlab.bench.runner import execute_run, run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import RunSpec, parse_suite
from curvlab.errors import DataNotFoundError, StoreError, UnknownNameError, WorkerError


def _spec(
    optimizer: str, hparams: dict, problem: str = "quadratic-k1e2", budget: int = 12, every: int = 4
) -> RunSpec:
    return RunSpec(problem, "x", optimizer, hparams, 0, "defaults", 0, 0, budget, every)


def _store_with(tmp_path: Path, spec: RunSpec) -> Store:
    st = Store(tmp_path / "s.sqlite")
    st.register("t", "{}", {}, [spec])
    return st


def test_clocks_evaluation_schedule_and_target(tmp_path: Path) -> None:
    spec = _spec("torch.optim:SGD", {"lr": 0.9, "momentum": 0.5})
    st = _store_with(tmp_path, spec)
    out = execute_run(spec, st.path, store=st)
    assert out["status"] == "finished"
    ev = st.evals(spec.run_id)
    assert [e["step"] for e in ev] == [0, 4, 8, 12]
    assert [e["grad_evals"] for e in ev] == [0.0, 4.0, 8.0, 12.0]  # one closure call per SGD step
    assert ev[0]["seconds"] == 0.0 and all(
        b["seconds"] >= a["seconds"] for a, b in itertools.pairwise(ev)
    )
    row = st.runs(run_id=spec.run_id)[0]
    assert row["steps"] == 12 and row["grad_evals"] == 12.0 and row["hvp_evals"] == 0
    assert row["final_metric"] == pytest.approx(ev[-1]["metrics"]["rel_subopt"])
    # time-to-target is the first scheduled evaluation at the target (rel_subopt <= 1e-3)
    hits = [e for e in ev if e["metrics"]["rel_subopt"] <= 1e-3]
    if hits:
        assert (
            row["ttt_steps"] == hits[0]["step"] and row["ttt_grad_evals"] == hits[0]["grad_evals"]
        )
    else:
        assert row["ttt_steps"] is None


def test_same_seed_same_trajectory(tmp_path: Path) -> None:
    spec = _spec("torch.optim:Adam", {"lr": 0.01}, problem="digits-mlp", budget=6, every=3)
    st = _store_with(tmp_path, spec)
    execute_run(spec, st.path, store=st)
    first = [e["metrics"] for e in st.evals(spec.run_id)]
    execute_run(spec, st.path, store=st)
    assert [e["metrics"] for e in st.evals(spec.run_id)] == first


def test_divergence_recorded_at_its_step_and_suite_goes_on(tmp_path: Path) -> None:
    doc = {
        "problems": {"quadratic-k1e2": {"budget_steps": 40, "eval_every": 5, "target": 1e-2}},
        "optimizers": [
            {"label": "wild", "optimizer": "torch.optim:SGD", "defaults": {"lr": 1e60}},
            {"label": "calm", "optimizer": "torch.optim:SGD", "defaults": {"lr": 0.5}},
        ],
        "tracks": {"defaults": {"seeds": 1, "budget_factor": 1.0}},
    }
    res = run_suite(parse_suite(doc), tmp_path / "s.sqlite", workers=0, progress=False)
    assert (res.finished, res.diverged, res.failed) == (1, 1, 0)
    st = Store(tmp_path / "s.sqlite")
    wild = st.runs(label="wild")[0]
    assert wild["status"] == "diverged" and 1 <= wild["diverged_step"] < 40
    assert wild["steps"] == wild["diverged_step"] and wild["ttt_steps"] is None
    assert st.runs(label="calm")[0]["status"] == "finished"


def test_loss_mode_closure_contract_and_exact_hvp_count(
    tmp_path: Path, fake_optimizers: str
) -> None:
    name = f"{fake_optimizers}:LossModeSGD"
    spec = _spec(name, {"lr": 0.05, "k": 3}, problem="breast-cancer-logreg", budget=7, every=7)
    st = _store_with(tmp_path, spec)
    out = execute_run(spec, st.path, store=st)
    assert out["status"] == "finished", out.get("error")
    row = st.runs(run_id=spec.run_id)[0]
    # refreshes at t = 0, 3, 6 -> 3 HVPs; GE = 7 gradients + 2 x 3
    assert row["hvp_evals"] == 3 and row["grad_evals"] == 7 + 6


def test_cost_model_estimate_without_counters() -> None:
    class Est(torch.optim.SGD):
        closure_mode = "loss"

    p = torch.nn.Parameter(torch.zeros(2))
    opt = Est([p], lr=0.1)
    opt.param_groups[0]["k"] = 2
    cm = CostModel(opt)
    costs = [cm.step_cost(1) for _ in range(4)]
    assert costs == [(3.0, 1), (1.0, 0), (3.0, 1), (1.0, 0)]

    class SophiaGLike(Est):
        pass

    cm = CostModel(SophiaGLike([p], lr=0.1))  # GNB estimator: 1 GE per refresh, every step (k=1)
    assert cm.step_cost(1) == (2.0, 0)


def test_logits_are_flattened_for_loss_mode(tmp_path: Path, fake_optimizers: str) -> None:
    import curvlab_test_opts  # type: ignore[import-not-found]

    seen: list = []
    orig = curvlab_test_opts.LossModeSGD.step

    def spy(self, closure=None):  # type: ignore[no-untyped-def]
        r = orig(self, closure)
        seen.extend(self.seen_outputs)
        return r

    curvlab_test_opts.LossModeSGD.step = spy
    try:
        spec = _spec(
            f"{fake_optimizers}:LossModeSGD",
            {"lr": 0.01},
            problem="charlm-pydoc",
            budget=1,
            every=1,
        )
        st = _store_with(tmp_path, spec)
        assert execute_run(spec, st.path, store=st)["status"] == "finished"
    finally:
        curvlab_test_opts.LossModeSGD.step = orig
    assert seen and len(seen[0]) == 2 and seen[0][0] == 32 * 32  # [batch * context, vocab]


def test_failure_is_recorded_and_suite_goes_on(tmp_path: Path) -> None:
    spec = _spec("torch.optim:SGD", {"lr": 0.1, "bogus_kw": 1})
    st = _store_with(tmp_path, spec)
    out = execute_run(spec, st.path, store=st)
    assert out["status"] == "failed" and "bogus_kw" in out["error"]
    assert st.runs(run_id=spec.run_id)[0]["status"] == "failed"


def test_resume_skips_done_and_restarts_unfinished(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    doc = tiny(
        problems={"quadratic-k1e2": {"budget_steps": 10, "eval_every": 5, "target": 1e-2}},
        tracks={"defaults": {"seeds": 2}, "tuned": {"trials": 1, "studies": 1}},
    )
    path = tmp_path / "s.sqlite"
    res = run_suite(parse_suite(doc), path, workers=0, progress=False)
    assert res.total == 2 * 3 and res.finished + res.diverged == 6 and res.already_done == 0
    st = Store(path)
    victim = st.runs()[0]["run_id"]
    dead = f"{socket.gethostname()}:{2**22 + 7}:0"  # a process id beyond Linux's pid_max
    with sqlite3.connect(path) as c:  # as if the process had died mid-run
        c.execute("UPDATE runs SET status='running', owner=? WHERE run_id=?", (dead, victim))
    attempt_before = st.runs(run_id=victim)[0]["attempt"]
    res2 = run_suite(parse_suite(doc), path, workers=0, progress=False)
    assert res2.already_done == 5 and res2.finished + res2.diverged == 1
    after = st.runs(run_id=victim)[0]
    assert after["attempt"] == attempt_before + 1 and after["status"] in ("finished", "diverged")
    assert next(e["step"] for e in st.evals(victim)) == 0
    res3 = run_suite(parse_suite(doc), path, workers=0, progress=False)
    assert res3.already_done == 6 and res3.finished == 0


def test_refusals_happen_before_any_run(
    tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import curvlab.bench.runner as runner

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("a run started")

    monkeypatch.setattr(runner, "execute_run", boom)
    monkeypatch.setattr(runner, "_run_pool", boom)
    afile = tmp_path / "f"
    afile.write_text("")
    with pytest.raises(StoreError, match="cannot create the store's directory"):
        run_suite(parse_suite(tiny()), afile / "s.sqlite", workers=0, progress=False)
    with pytest.raises(UnknownNameError, match=r"cannot import optimizer 'nosuch\.mod:Opt'"):
        run_suite(
            parse_suite(
                tiny(
                    optimizers=[
                        {"label": "z", "optimizer": "nosuch.mod:Opt", "search": {"lr": [0.1]}}
                    ]
                ),
                allow_import=True,
            ),
            tmp_path / "a.sqlite",
            workers=0,
        )
    # a built-in entry missing from the registry is skipped with a note, the others run
    notes: list[str] = []
    doc = tiny(optimizers=["psgdkron"])
    monkeypatch.setattr("curvlab.optim.registry.OPTIMIZERS", {})  # as if not installed
    with pytest.raises(UnknownNameError, match="none of the suite's optimizers is available"):
        run_suite(parse_suite(doc), tmp_path / "b.sqlite", workers=0, log=notes.append)
    assert notes and "not in curvlab's registry" in notes[0]
    # missing data: a clear error, before any run
    monkeypatch.setenv("CURVLAB_DATA", str(tmp_path / "nodata"))
    monkeypatch.setattr("curvlab.datasets.DEBIAN_FASHION_MNIST", tmp_path / "nodebian")
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        run_suite(
            parse_suite(tiny(problems={"fashion-mlp": {"target": 0.8}})),
            tmp_path / "c.sqlite",
            workers=0,
        )
    # nothing of this reached a store
    assert not (tmp_path / "c.sqlite").exists() or Store(tmp_path / "c.sqlite").runs() == []


def test_unknown_registry_name_suggests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "curvlab.optim.registry.OPTIMIZERS", {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    )
    with pytest.raises(
        UnknownNameError,
        match=r"unknown optimizer 'adamx'\. Did you mean 'adamw'\? Known optimizers: adamw, sgd",
    ):
        resolve_optimizer("adamx")
    assert resolve_optimizer("sgd") is torch.optim.SGD
    assert math.isfinite(1.0)


def test_bad_input_loses_nothing_from_an_existing_store(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    doc = tiny(
        problems={"quadratic-k1e2": {"budget_steps": 6, "eval_every": 3, "target": 1e-2}},
        tracks={"defaults": {"seeds": 1}},
    )
    path = tmp_path / "s.sqlite"
    run_suite(parse_suite(doc), path, workers=0, progress=False)
    before = Store(path).runs()
    evals_before = Store(path).evals()
    bad = tiny(optimizers=[{"label": "z", "optimizer": "no.such:Opt", "search": {"lr": [0.1]}}])
    with pytest.raises(UnknownNameError):
        run_suite(parse_suite(bad, allow_import=True), path, workers=0, progress=False)
    assert Store(path).runs() == before and Store(path).evals() == evals_before
    assert Store(path).integrity_check() == "ok"


def test_workers_that_die_in_their_bootstrap_raise_worker_error(
    tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # A script without a `__main__` guard: each spawned worker re-runs it and dies importing it.
    # Every run would die twice and be marked failed (the suite "finishing" with all runs
    # failed); the runner must instead stop after 3 pools and name the guard.
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import multiprocessing\n"
        "multiprocessing.get_context('spawn').Process(target=print).start()\n"
    )
    fake_main = types.ModuleType("__main__")
    fake_main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    doc = tiny(
        problems={"quadratic-k1e2": {"budget_steps": 10, "eval_every": 5, "target": 1e-2}},
        tracks={"defaults": {"seeds": 1}, "tuned": {"trials": 1, "studies": 1}},
    )
    notes: list[str] = []
    path = tmp_path / "s.sqlite"
    with pytest.raises(WorkerError, match=r"keep dying .*if __name__ == '__main__':.*workers=0"):
        run_suite(parse_suite(doc), path, workers=1, progress=False, log=notes.append)
    assert len(notes) == 3 and not any("run failed" in n for n in notes)
    assert {r["status"] for r in Store(path).runs()} == {"pending"}  # no run was blamed
