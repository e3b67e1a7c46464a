"""AlgoPerf-style scores on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curvlab.bench.scoring import (
    compare,
    final_quality,
    geomean_speedups,
    lr_sensitivity,
    performance_profiles,
    profile_band,
    sign_test,
    study_times,
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


def _cell(label: str, times: list[float | None], problem: str = "p", end: float = 1000.0):  # type: ignore[no-untyped-def]
    """One run per study; ``None``: the study missed the target (censored at ``end`` steps)."""
    return [
        _run(label, s, t, problem=problem, steps=end, grad_evals=2 * end)
        for s, t in enumerate(times)
    ]


def test_study_times_censor_a_miss_at_the_smallest_end_clock() -> None:
    runs = [
        _run("a", 0, None, steps=100),
        _run("a", 0, None, steps=80),
        _run("a", 1, None, status="diverged", steps=5),
        _run("a", 2, 30, steps=100),
    ]
    st = study_times(runs, "steps")[("p", "a", "tuned")]
    assert st[0] == (math.inf, 80.0)
    assert st[1] == (math.inf, math.inf)  # a diverged run never reaches: no finite bound
    assert st[2] == (30.0, 30.0)


def test_sign_test_exact_binomial() -> None:
    assert sign_test(6, 0) == pytest.approx(2 / 64)
    assert sign_test(3, 3) == 1.0
    assert sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 1024)


def test_compare_verdicts_come_from_the_interval() -> None:
    ref = [100.0, 110.0, 120.0, 105.0, 115.0]
    runs = _cell("adamw", ref)  # type: ignore[arg-type]
    runs += _cell("fast", [50.0, 55.0, 60.0, 52.0, 58.0])  # type: ignore[arg-type]
    runs += _cell("slow", [200.0, 230.0, 250.0, 210.0, 240.0])  # type: ignore[arg-type]
    runs += _cell("same", [95.0, 125.0, 100.0, 118.0, 108.0])  # type: ignore[arg-type]
    runs += _cell("never", [None] * 5)
    cmp = compare(runs, "steps")
    fast = cmp[("p", "fast", "tuned")]
    assert fast.verdict == "faster" and fast.kind == "exact" and fast.paired
    assert fast.speedup == pytest.approx(110.0 / 55.0)
    assert 1.0 < fast.ci_low <= fast.speedup <= fast.ci_high
    assert (fast.wins, fast.losses, fast.ties) == (5, 0, 0)
    assert fast.sign_p == pytest.approx(2 / 32)
    assert cmp[("p", "slow", "tuned")].verdict == "slower"
    assert cmp[("p", "slow", "tuned")].ci_high < 1.0
    same = cmp[("p", "same", "tuned")]
    assert same.verdict == "no detectable difference" and same.ci_low < 1.0 < same.ci_high
    never = cmp[("p", "never", "tuned")]
    # a miss is a bound, not a number: speed-up <= 110/1000, interval open at 0
    assert never.kind == "at_most" and never.speedup == pytest.approx(0.11)
    assert never.ci_low == 0.0 and never.verdict == "slower" and never.reached == 0
    assert ("p", "adamw", "tuned") not in cmp
    # deterministic: the same runs give the same intervals
    again = compare(runs, "steps")[("p", "same", "tuned")]
    assert (again.ci_low, again.ci_high) == (same.ci_low, same.ci_high)


def test_compare_when_the_reference_misses_is_a_lower_bound_or_undefined() -> None:
    runs = _cell("adamw", [None, None, None], end=500.0)
    runs += _cell("x", [100.0, 120.0, 110.0], end=500.0)  # type: ignore[arg-type]
    runs += _cell("y", [None, None, None], end=500.0)
    cmp = compare(runs, "steps")
    x = cmp[("p", "x", "tuned")]
    assert x.kind == "at_least" and x.speedup == pytest.approx(500.0 / 110.0)
    assert math.isinf(x.ci_high) and x.verdict == "faster"
    y = cmp[("p", "y", "tuned")]
    assert y.kind == "undefined" and y.verdict == "neither reached" and math.isnan(y.speedup)


def test_compare_unpaired_and_too_few_studies() -> None:
    runs = [*_cell("adamw", [100.0, 110.0, 120.0]), _run("x", 7, 50.0, steps=1000.0)]  # type: ignore[arg-type]
    c = compare(runs, "steps")[("p", "x", "tuned")]
    assert not c.paired and c.verdict == "too few studies" and math.isnan(c.sign_p)


def test_geomean_only_over_problems_both_reached() -> None:
    runs = _cell("adamw", [100.0, 100.0, 100.0]) + _cell("x", [25.0, 25.0, 25.0])  # type: ignore[arg-type]
    runs += _cell("adamw", [100.0] * 3, problem="q") + _cell("x", [100.0] * 3, problem="q")  # type: ignore[arg-type]
    runs += _cell("adamw", [100.0] * 3, problem="r") + _cell("x", [None] * 3, problem="r")  # type: ignore[arg-type]
    g = geomean_speedups(compare(runs, "steps"))[("x", "tuned")]
    assert g.value == pytest.approx(2.0) and (g.used, g.problems) == (2, 3)


def test_profile_band_contains_the_profile_and_is_deterministic() -> None:
    runs = _cell("a", [10.0, 12.0, 30.0]) + _cell("b", [20.0, 11.0, 15.0])  # type: ignore[arg-type]
    runs += _cell("a", [5.0, 5.0, 5.0], problem="q") + _cell("b", [None] * 3, problem="q")  # type: ignore[arg-type]
    _, rho, band = profile_band(runs, "steps", "tuned", taus=[1.0, 2.0, 4.0])
    _, rho_plain, _ = performance_profiles(
        {"p": {"a": 12.0, "b": 15.0}, "q": {"a": 5.0, "b": math.inf}}, taus=[1.0, 2.0, 4.0]
    )
    for lab in ("a", "b"):
        assert rho[lab].tolist() == rho_plain[lab].tolist()
        lo, hi = band[lab]
        assert (lo <= rho[lab] + 1e-12).all() and (rho[lab] <= hi + 1e-12).all()
    assert band["b"][1][-1] == 0.5  # b never reaches q: at most half the problems
    again = profile_band(runs, "steps", "tuned", taus=[1.0, 2.0, 4.0])[2]
    assert all((again[k][0] == band[k][0]).all() for k in band)
