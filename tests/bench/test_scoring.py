"""AlgoPerf-style scores on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curvlab.bench.scoring import (
    final_quality,
    lr_sensitivity,
    miss_values,
    performance_profiles,
    speedups,
    time_to_target,
)


def _run(
    label: str, study: int, t: float | None, status: str = "finished", track: str = "tuned", **kw
):  # type: ignore[no-untyped-def]
    return {
        "problem": kw.pop("problem", "p"),
        "label": label,
        "track": track,
        "study": study,
        "status": status,
        "ttt_steps": t,
        "ttt_grad_evals": None if t is None else 2 * t,
        "ttt_seconds": None,
        **kw,
    }


def test_time_to_target_is_median_over_studies_of_best_trial() -> None:
    runs = [
        _run("a", 0, 30),
        _run("a", 0, 10),
        _run("a", 1, 40),
        _run("a", 1, None),
        _run("a", 2, 20, status="diverged"),
        _run("a", 2, None),
    ]
    ttt = time_to_target(runs, "steps")
    assert ttt[("p", "a", "tuned")] == 20.0  # median(10, 40, 20)
    assert time_to_target(runs, "grad_evals")[("p", "a", "tuned")] == 40.0
    assert math.isinf(time_to_target(runs, "seconds")[("p", "a", "tuned")])
    # a run still 'running' (killed) never counts as reaching the target
    assert math.isinf(time_to_target([_run("b", 0, 5, status="running")])[("p", "b", "tuned")])
    # a majority of missed studies is a miss
    assert math.isinf(
        time_to_target([_run("c", 0, 5), _run("c", 1, None), _run("c", 2, None)])[
            ("p", "c", "tuned")
        ]
    )


def test_final_quality_best_trial_per_study() -> None:
    runs = [
        _run("a", 0, None, final_metric=0.5),
        _run("a", 0, None, final_metric=0.9),
        _run("a", 1, None, final_metric=0.7),
        _run("a", 1, None, status="diverged", final_metric=None),
    ]
    q = final_quality(runs, {"p": True})[("p", "a", "tuned")]
    assert q["mean"] == pytest.approx(0.8) and q["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert q["n"] == 2 and q["diverged"] == 1
    q = final_quality(runs, {"p": False})[("p", "a", "tuned")]
    assert q["mean"] == pytest.approx(0.6)


def test_performance_profile_values() -> None:
    times = {"p1": {"a": 10.0, "b": 20.0, "c": 50.0}, "p2": {"a": math.inf, "b": 5.0, "c": 6.0}}
    _, rho, score = performance_profiles(times, taus=[1.0, 2.0, 4.0])
    assert rho["a"].tolist() == [0.5, 0.5, 0.5]
    assert rho["b"].tolist() == [0.5, 1.0, 1.0]
    assert rho["c"].tolist() == [0.0, 0.5, 0.5]  # 50/10 = 5 > 4 counts as a miss
    # B on the 3-point grid by the trapezoid rule: ((0.5+1)/2*1 + 1*2)/3
    assert score["b"] == pytest.approx((0.75 + 2.0) / 3.0)
    assert score["a"] == pytest.approx(0.5)


def test_speedup_geomean_with_misses_at_budget_plus_one() -> None:
    ttt = {
        ("p", "adamw", "tuned"): 100.0,
        ("p", "x", "tuned"): 25.0,
        ("q", "adamw", "tuned"): math.inf,
        ("q", "x", "tuned"): 50.0,
    }
    misses = miss_values(
        [
            {"problem": "p", "budget_steps": 200, "grad_evals": 400.0, "seconds": 1.0},
            {"problem": "q", "budget_steps": 99, "grad_evals": 99.0, "seconds": 2.0},
        ]
    )
    assert misses[("q", "steps")] == 100.0 and misses[("p", "grad_evals")] == 401.0
    sp = speedups(ttt, misses, "steps", "adamw")
    assert sp["adamw"] == pytest.approx(1.0)
    assert sp["x"] == pytest.approx(math.sqrt(4.0 * 2.0))  # 100/25 and (99+1)/50
    assert speedups(ttt, misses, "steps", "nonexistent") == {}


def test_lr_sensitivity_marks_diverged_as_nan() -> None:
    runs = [
        {
            "problem": "p",
            "label": "a",
            "track": "tuned",
            "hparams": {"lr": 0.1},
            "status": "finished",
            "final_metric": 1.0,
        },
        {
            "problem": "p",
            "label": "a",
            "track": "tuned",
            "hparams": {"lr": 0.01},
            "status": "finished",
            "final_metric": 2.0,
        },
        {
            "problem": "p",
            "label": "a",
            "track": "tuned",
            "hparams": {"lr": 1.0},
            "status": "diverged",
            "final_metric": None,
        },
        {
            "problem": "p",
            "label": "a",
            "track": "defaults",
            "hparams": {"lr": 0.5},
            "status": "finished",
            "final_metric": 9.0,
        },
    ]
    pts = lr_sensitivity(runs)["p"]["a"]
    assert [x for x, _ in pts] == [0.01, 0.1, 1.0]
    assert pts[0][1] == 2.0 and math.isnan(pts[2][1])
