"""Curvature inside every run: monitors attached by a suite, recorded off the clock, refused early."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from curvlab.bench.problems import get_problem
from curvlab.bench.runner import run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import load_suite, parse_suite
from curvlab.errors import MonitorMismatchError, SuiteError, UnknownNameError

ADAMW = {
    "label": "adamw",
    "optimizer": "torch.optim:AdamW",
    "fixed": {"weight_decay": 0.0},
    "defaults": {"lr": 0.01},
    "search": {"lr": {"low": 1e-3, "high": 0.3}},
}
SGD = {"label": "sgd", "optimizer": "torch.optim:SGD", "defaults": {"lr": 0.005}}


_TARGETS = {"quadratic-k1e2": 1e-2, "digits-mlp": 0.5, "noisy-quadratic": 1e-2}


def _suite(monitors: Any, problems: Any = None, optimizers: Any = None) -> dict[str, Any]:
    problems = problems or {"quadratic-k1e2": {"budget_steps": 20, "eval_every": 10}}
    return {
        "name": "mon",
        "problems": problems,
        "targets": {p: _TARGETS[p] for p in problems},
        "optimizers": optimizers or [ADAMW, SGD],
        "tracks": {"defaults": {"seeds": 1}},
        "monitors": monitors,
    }


def _run(tmp_path: Path, doc: dict[str, Any], name: str = "s.sqlite") -> Store:
    path = tmp_path / name
    run_suite(parse_suite(doc), path, workers=0, progress=False)
    return Store(path)


def test_sharpness_recorded_per_run_off_the_clock_and_exact(tmp_path: Path) -> None:
    mons = [
        {"name": "sharpness", "every": 5},
        {"name": "adam_sharpness", "every": 10, "optimizers": ["adamw"]},
    ]
    st = _run(tmp_path, _suite(mons))
    runs = {r["label"]: r for r in st.runs()}
    assert all(r["status"] == "finished" for r in runs.values())
    sgd = st.monitor_values(runs["sgd"]["run_id"])
    assert sorted({v["step"] for v in sgd}) == [5, 10, 15, 20, 25, 30]  # defaults: 1.5 x 20 steps
    assert not any(v["name"].startswith("adam_sharpness/") for v in sgd)
    # the quadratic's Hessian is its matrix Q: λ_max exact, ratio = λ_max·η/2 for plain SGD
    model = get_problem("quadratic-k1e2").build(runs["sgd"]["seed"]).model
    lam = float(torch.linalg.eigvalsh(model.q.double())[-1])  # type: ignore[operator]
    val = {(v["step"], v["name"]): v["value"] for v in sgd}
    assert val[(5, "sharpness/value")] == pytest.approx(lam, rel=1e-3)
    assert val[(5, "sharpness/ratio")] == pytest.approx(lam * 0.005 / 2, rel=1e-3)
    adam = {v["name"] for v in st.monitor_values(runs["adamw"]["run_id"])}
    assert {"adam_sharpness/preconditioned", "adam_sharpness/preconditioned_ratio"} <= adam
    st.close()


def test_monitors_leave_the_step_clock_records_bit_identical(tmp_path: Path) -> None:
    problems = {
        "quadratic-k1e2": {"budget_steps": 20, "eval_every": 10},
        "digits-mlp": {"budget_steps": 12, "eval_every": 6},
    }
    mons = [
        {"name": "sharpness", "every": 4},
        {"name": "noise_scale", "every": 6, "problems": ["digits-mlp"], "batches": 4},
    ]
    on = _run(tmp_path, _suite(mons, problems), "on.sqlite")
    off = _run(tmp_path, _suite(None, problems), "off.sqlite")
    keep = ("step", "grad_evals", "hvp_evals", "train_loss", "metrics")
    for a, b in zip(on.evals(), off.evals(), strict=True):
        assert a["run_id"] == b["run_id"] and {k: a[k] for k in keep} == {k: b[k] for k in keep}
    mlp = next(r for r in on.runs() if r["problem"] == "digits-mlp" and r["label"] == "sgd")
    names = {v["name"] for v in on.monitor_values(mlp["run_id"])}
    assert "noise_scale/b_simple" in names and "sharpness/value" in names
    on.close()
    off.close()


def test_adam_sharpness_on_sgd_is_refused_when_the_suite_loads() -> None:
    with pytest.raises(MonitorMismatchError, match=r"adam_sharpness needs an Adam-type optimizer"):
        parse_suite(_suite([{"name": "adam_sharpness"}]))
    with pytest.raises(MonitorMismatchError, match=r"sgd \(torch.optim:SGD\) is not; restrict it"):
        parse_suite(_suite([{"name": "adam_sharpness"}]))


def test_noise_scale_without_minibatches_is_refused_before_any_run(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    suite = parse_suite(_suite([{"name": "noise_scale"}]))
    with pytest.raises(MonitorMismatchError, match=r"noise_scale needs minibatches, and problem "):
        run_suite(suite, path, workers=0, progress=False)
    assert Store(path).runs() == []  # nothing registered, nothing run


@pytest.mark.parametrize(
    ("monitors", "error", "fragment"),
    [
        ([{"name": "curvature"}], UnknownNameError, "unknown monitor 'curvature'"),
        ([{"name": "sharpness", "every": 0}], SuiteError, "monitors[0].every: expected an integer"),
        ([{"name": "sharpness", "batches": 3}], SuiteError, "monitors[0].batches: unknown field"),
        ([{"name": "sharpness", "optimizers": ["adam"]}], SuiteError, "'adam' is not in the suite"),
        (["sharpness", "sharpness"], SuiteError, "each monitor may appear once"),
        ({"name": "sharpness"}, SuiteError, "monitors: expected a list"),
    ],
)
def test_bad_monitor_entries(monitors: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_suite(_suite(monitors))


def test_quick_suite_records_sharpness() -> None:
    assert [m.name for m in load_suite("quick").monitors] == ["sharpness"]
