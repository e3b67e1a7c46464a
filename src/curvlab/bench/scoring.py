"""Scores from a store: time-to-target, final quality, profiles, speed-ups, LR sensitivity.

The rules, after MLCommons AlgoPerf (Dahl et al. 2023, arXiv 2306.07179;
``scoring/performance_profile.py``)
and DeepOBS/Crowded Valley (arXiv 2007.01547):

* **time-to-target** of (problem, optimizer, track) on a clock (``steps``, ``grad_evals``,
``seconds``):
  per study, the fastest trial that reached the target (a miss or a divergence is ∞); then the
  median over studies. In the defaults track every seed is a study of one trial.
* **final quality**: the problem's final metric at the budget; defaults track: mean ± std over
  seeds; tuned track: the best trial of each study (by final metric), mean ± std over studies.
  Diverged runs are excluded from the mean and counted.
* **performance profile** (Dolan & Moré 2002): ``r = t / min_optimizers t`` per problem, ratios
above
  ``tau_max = 4`` count as ∞; ``ρ(τ)`` is the fraction of problems with ``r ≤ τ`` on ``τ ∈ [1,
  4]``, and
  ``B = ∫₁⁴ ρ(τ) dτ / 3``.
* **speed-up over the reference** (tuned AdamW): per problem ``t_ref / t``, misses placed at the
  clock's budget plus one unit (budget steps + 1; the largest gradient-equivalent or seconds count
  any run of the problem reached at its end, + 1), then the geometric mean over problems (PR #778).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CLOCKS",
    "final_quality",
    "lr_sensitivity",
    "miss_values",
    "performance_profiles",
    "speedups",
    "time_to_target",
]

CLOCKS = ("steps", "grad_evals", "seconds")
_TTT = {"steps": "ttt_steps", "grad_evals": "ttt_grad_evals", "seconds": "ttt_seconds"}


def _run_time(run: Mapping[str, Any], clock: str) -> float:
    v = run.get(_TTT[clock])
    if run.get("status") != "finished" and run.get("status") != "diverged":
        return math.inf
    return math.inf if v is None else float(v)


def time_to_target(
    runs: Iterable[Mapping[str, Any]], clock: str = "steps"
) -> dict[tuple[str, str, str], float]:
    """``(problem, label, track) -> median over studies of the fastest trial`` (∞ for a miss).

    Example:
        >>> runs = [dict(problem="p", label="a", track="tuned", study=s, status="finished",
        ...              ttt_steps=t) for s, t in [(0, 30), (0, 10), (1, None), (2, 50)]]
        >>> time_to_target(runs)[("p", "a", "tuned")]
        50.0
    """
    best: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in runs:
        key = (r["problem"], r["label"], r["track"])
        t = _run_time(r, clock)
        s = int(r["study"])
        best[key][s] = min(best[key].get(s, math.inf), t)
    return {k: float(np.median(list(v.values()))) for k, v in best.items()}


def final_quality(
    runs: Iterable[Mapping[str, Any]], higher_is_better: Mapping[str, bool]
) -> dict[tuple[str, str, str], dict[str, float]]:
    """``(problem, label, track) -> {mean, std, n, diverged}`` of the final metric."""
    groups: dict[tuple[str, str, str], dict[int, list[Mapping[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in runs:
        groups[(r["problem"], r["label"], r["track"])][int(r["study"])].append(r)
    out = {}
    for key, studies in groups.items():
        hib = higher_is_better.get(key[0], False)
        vals, diverged = [], 0
        for members in studies.values():
            finite = [
                float(m["final_metric"])
                for m in members
                if m.get("status") == "finished"
                and m.get("final_metric") is not None
                and math.isfinite(float(m["final_metric"]))
            ]
            diverged += sum(1 for m in members if m.get("status") == "diverged")
            if finite:
                vals.append(max(finite) if hib else min(finite))
        arr = np.asarray(vals, dtype=float)
        out[key] = {
            "mean": float(arr.mean()) if arr.size else math.nan,
            "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0 if arr.size else math.nan,
            "n": int(arr.size),
            "diverged": diverged,
        }
    return out


def performance_profiles(
    times: Mapping[str, Mapping[str, float]],
    taus: Sequence[float] | None = None,
    tau_max: float = 4.0,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Performance profiles over problems.

    Args:
        times: ``problem -> {optimizer: time}`` (∞ for a miss).
        taus: grid on ``[1, tau_max]`` (default 301 points).
        tau_max: ratios above it count as misses (AlgoPerf uses 4).

    Returns:
        ``(taus, {optimizer: ρ(τ)}, {optimizer: B})`` where B is the normalised area under ρ.

    Example:
        >>> times = {"p": {"a": 10.0, "b": 20.0}, "q": {"a": math.inf, "b": 5.0}}
        >>> t, rho, b = performance_profiles(times)
        >>> float(rho["a"][0]), float(rho["b"][-1]), round(b["a"], 3)
        (0.5, 1.0, 0.5)
    """
    grid = np.linspace(1.0, tau_max, 301) if taus is None else np.asarray(taus, dtype=float)
    opts = sorted({o for v in times.values() for o in v})
    ratios: dict[str, list[float]] = {o: [] for o in opts}
    for per in times.values():
        best = min((t for t in per.values()), default=math.inf)
        for o in opts:
            t = per.get(o, math.inf)
            r = (
                t / best
                if math.isfinite(best) and math.isfinite(t) and best > 0
                else (1.0 if math.isfinite(t) and t == best else math.inf)
            )
            ratios[o].append(r if r <= tau_max else math.inf)
    rho = {}
    score = {}
    n = max(len(times), 1)
    for o in opts:
        rr = np.asarray(ratios[o])
        rho[o] = np.array([(rr <= tau).sum() / n for tau in grid])
        score[o] = (
            float((0.5 * (rho[o][1:] + rho[o][:-1]) * np.diff(grid)).sum() / (grid[-1] - grid[0]))
            if len(grid) > 1
            else float(rho[o][0])
        )
    return grid, rho, score


def miss_values(runs: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """``(problem, clock) -> value for a miss`` in the speed-up: the clock's budget + 1 unit."""
    out: dict[tuple[str, str], float] = {}
    for r in runs:
        p = r["problem"]
        out[(p, "steps")] = max(out.get((p, "steps"), 0.0), float(r["budget_steps"]) + 1.0)
        for c in ("grad_evals", "seconds"):
            v = r.get(c)
            if v is not None and math.isfinite(float(v)):
                out[(p, c)] = max(out.get((p, c), 0.0), float(v) + 1.0)
    return out


def speedups(
    ttt: Mapping[tuple[str, str, str], float],
    misses: Mapping[tuple[str, str], float],
    clock: str,
    reference: str = "adamw",
    track: str = "tuned",
) -> dict[str, float]:
    """Geometric-mean speed-up of each optimizer over ``reference`` in ``track`` on ``clock``.

    Returns an empty dict when the reference has no runs in that track.

    Example:
        >>> ttt = {("p", "adamw", "tuned"): 100.0, ("p", "x", "tuned"): 50.0,
        ...        ("q", "adamw", "tuned"): 40.0, ("q", "x", "tuned"): math.inf}
        >>> misses = {("p", "steps"): 201.0, ("q", "steps"): 81.0}
        >>> round(speedups(ttt, misses, "steps", "adamw")["x"], 4)
        0.9938
    """
    problems = sorted({p for (p, lab, tr) in ttt if lab == reference and tr == track})
    if not problems:
        return {}
    labels = sorted({lab for (_, lab, tr) in ttt if tr == track})
    out = {}
    for lab in labels:
        logs = []
        for p in problems:
            miss = misses.get((p, clock), math.inf)
            ref = ttt.get((p, reference, track), math.inf)
            t = ttt.get((p, lab, track), math.inf)
            ref = ref if math.isfinite(ref) else miss
            t = t if math.isfinite(t) else miss
            if math.isfinite(ref) and math.isfinite(t) and t > 0 and ref > 0:
                logs.append(math.log(ref / t))
        out[lab] = math.exp(sum(logs) / len(logs)) if logs else math.nan
    return out


def lr_sensitivity(
    runs: Iterable[Mapping[str, Any]],
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``problem -> label -> [(lr, final metric)]`` of the tuned track (NaN: diverged), by lr."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["track"] != "tuned" or "lr" not in r["hparams"]:
            continue
        v = r.get("final_metric")
        val = float(v) if (r.get("status") == "finished" and v is not None) else math.nan
        out[r["problem"]][r["label"]].append((float(r["hparams"]["lr"]), val))
    return {p: {lab: sorted(v) for lab, v in d.items()} for p, d in out.items()}
