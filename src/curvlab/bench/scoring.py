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
* **speed-up over the reference** (tuned AdamW by default), per problem, optimizer, track and
  clock: ``s = median_ref / median_opt`` over studies (>1: faster than the reference), the
  reference taken in the same track. Its 95% interval is a percentile bootstrap over studies
  (:data:`RESAMPLES` resamples, seeded from the cell's name, so the same store gives the same
  interval): studies are resampled as pairs when both sides ran the same studies (the tuned
  track's study ``j`` and the defaults track's seed ``j`` share their seed across optimizers),
  independently otherwise. The verdict comes from the interval alone: ``faster`` if it lies above
  1, ``slower`` if below, otherwise ``no detectable difference``.
* **misses are censored, never imputed**: a study that never reaches the target has a time beyond
  its runs' end (the clock at the budget; ∞ for a diverged run). Medians order misses last, so a
  median is exact or known only as a lower bound (the median of the censoring points, valid
  because order statistics are monotone). A ratio with a censored side is a bound (``s ≤ b`` when
  the optimizer missed, ``s ≥ b`` when the reference did), and the interval takes each censored
  bootstrap replicate at its least favourable end (0 or ∞ on the open side), so censoring widens
  the interval rather than inventing a number.
* **paired test**: where both sides ran the same studies, an exact two-sided sign test on the
  per-study times (ties, including two misses, dropped); with n pairs its smallest possible p is
  2^(1−n), so fewer than 6 pairs can never give p < 0.05.
* **geometric-mean speed-up** of an optimizer over the reference: only over the problems where both
  medians reached the target, with that count stated.
* **performance profiles with uncertainty**: the profile of each bootstrap replicate (studies
  resampled within every cell); the band is the pointwise 2.5–97.5% range.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CLOCKS",
    "final_quality",
    "lr_sensitivity",
    "RESAMPLES",
    "Comparison",
    "GeoMean",
    "compare",
    "geomean_speedups",
    "performance_profiles",
    "profile_band",
    "sign_test",
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
        with np.errstate(over="ignore"):  # a runaway final value: its std is inf, said so
            std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0 if arr.size else math.nan
        out[key] = {
            "mean": float(arr.mean()) if arr.size else math.nan,
            "std": std,
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


#: Bootstrap resamples of every interval (percentile method).
RESAMPLES = 2000
_LEVEL = 0.95
_Key = tuple[str, str, str]


def _end_clock(run: Mapping[str, Any], clock: str) -> float:
    """Where a missed run's time is censored: its clock at the end (∞ if it can never reach)."""
    if run.get("status") != "finished":
        return math.inf
    v = run.get(clock)
    return math.inf if v is None else float(v)


def study_times(
    runs: Iterable[Mapping[str, Any]], clock: str = "steps"
) -> dict[_Key, dict[int, tuple[float, float]]]:
    """``(problem, label, track) -> study -> (time, bound)`` on ``clock``.

    ``time`` is the fastest trial's time-to-target (∞: no trial reached it); ``bound`` is the time
    itself, or for a miss the smallest end clock of the study's trials (the true time lies beyond
    it; ∞ when every trial diverged or failed).

    Example:
        >>> runs = [dict(problem="p", label="a", track="tuned", study=0, status="finished",
        ...              ttt_steps=None, steps=100)]
        >>> study_times(runs)[("p", "a", "tuned")]
        {0: (inf, 100.0)}
    """
    out: dict[_Key, dict[int, tuple[float, float]]] = defaultdict(dict)
    for r in runs:
        key = (r["problem"], r["label"], r["track"])
        s = int(r["study"])
        t = _run_time(r, clock)
        bound = t if math.isfinite(t) else _end_clock(r, clock)
        old_t, old_b = out[key].get(s, (math.inf, math.inf))
        out[key][s] = (min(old_t, t), min(old_b, bound))
    return dict(out)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: ``P(|W − n/2| ≥ |wins − n/2|)`` for ``W ~ Bin(n, 1/2)``.

    Example:
        >>> sign_test(5, 0), sign_test(2, 1), sign_test(0, 0)
        (0.0625, 1.0, 1.0)
    """
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class Comparison:
    """An optimizer against the reference on one problem, track and clock (module docstring).

    Attributes:
        speedup: ``median_ref / median_opt`` (>1: faster); with ``kind`` ``"at_most"`` or
            ``"at_least"`` it is a bound, with ``"undefined"`` NaN.
        kind: ``"exact"``, ``"at_most"`` (the optimizer's median missed the target), ``"at_least"``
            (the reference's median missed), ``"undefined"`` (both missed).
        ci_low, ci_high: the 95% bootstrap interval (0 and ∞ are open ends).
        verdict: ``"faster"``, ``"slower"``, ``"no detectable difference"``, ``"neither reached"``
            or ``"too few studies"`` (fewer than 2 on a side).
        n, n_ref: studies of the optimizer and of the reference; ``paired``: same studies.
        wins, losses, ties: per-study comparisons (paired only); ``sign_p``: the sign test's p
            (NaN when unpaired).
        reached, reached_ref: studies that reached the target on each side.
    """

    problem: str
    label: str
    track: str
    clock: str
    reference: str
    speedup: float
    kind: str
    ci_low: float
    ci_high: float
    verdict: str
    n: int
    n_ref: int
    paired: bool
    wins: int
    losses: int
    ties: int
    sign_p: float
    reached: int
    reached_ref: int
    resamples: int = RESAMPLES


def _seed_of(*parts: str) -> int:
    return zlib.crc32("\x1f".join(parts).encode())


def _ratio_bounds(
    med_ref: np.ndarray, lb_ref: np.ndarray, med: np.ndarray, lb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The least and most favourable speed-up each replicate allows (censored sides open)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = med_ref / med
        at_most = med_ref / lb  # the optimizer missed: s in (0, med_ref / lb]
        at_least = lb_ref / med  # the reference missed: s in [lb_ref / med, inf)
    fin, fin_ref = np.isfinite(med), np.isfinite(med_ref)
    low = np.where(fin & fin_ref, exact, np.where(fin, at_least, 0.0))
    high = np.where(fin & fin_ref, exact, np.where(fin_ref, at_most, np.inf))
    return np.nan_to_num(low, nan=0.0, posinf=np.inf), np.nan_to_num(
        high, nan=np.inf, posinf=np.inf
    )


def _compare_cell(
    key: _Key,
    ref_key: _Key,
    cell: Mapping[int, tuple[float, float]],
    ref: Mapping[int, tuple[float, float]],
    clock: str,
    resamples: int,
    seed: int,
) -> Comparison:
    studies, ref_studies = sorted(cell), sorted(ref)
    paired = studies == ref_studies and len(studies) >= 2
    t = np.array([cell[s][0] for s in studies])
    lb = np.array([cell[s][1] for s in studies])
    tr = np.array([ref[s][0] for s in ref_studies])
    lbr = np.array([ref[s][1] for s in ref_studies])
    lo, hi = _ratio_bounds(
        np.array([np.median(tr)]),
        np.array([np.median(lbr)]),
        np.array([np.median(t)]),
        np.array([np.median(lb)]),
    )
    fin, fin_ref = math.isfinite(float(np.median(t))), math.isfinite(float(np.median(tr)))
    kind = {
        (True, True): "exact",
        (False, True): "at_most",
        (True, False): "at_least",
        (False, False): "undefined",
    }[(fin, fin_ref)]
    speedup = {"exact": lo[0], "at_most": hi[0], "at_least": lo[0], "undefined": math.nan}[kind]
    rng = np.random.default_rng([seed, _seed_of(*key, clock)])
    idx = rng.integers(0, len(t), size=(resamples, len(t)))
    idx_ref = idx if paired else rng.integers(0, len(tr), size=(resamples, len(tr)))
    low, high = _ratio_bounds(
        np.median(tr[idx_ref], axis=1),
        np.median(lbr[idx_ref], axis=1),
        np.median(t[idx], axis=1),
        np.median(lb[idx], axis=1),
    )
    alpha = (1.0 - _LEVEL) / 2.0
    ci_low = float(np.quantile(low, alpha, method="lower"))
    ci_high = float(np.quantile(high, 1.0 - alpha, method="higher"))
    if kind == "undefined":
        verdict = "neither reached"
    elif min(len(t), len(tr)) < 2:
        verdict = "too few studies"
    elif ci_low > 1.0:
        verdict = "faster"
    elif ci_high < 1.0:
        verdict = "slower"
    else:
        verdict = "no detectable difference"
    wins = losses = ties = 0
    if paired:
        wins, losses = int((t < tr).sum()), int((t > tr).sum())
        ties = len(t) - wins - losses
    return Comparison(
        problem=key[0],
        label=key[1],
        track=key[2],
        clock=clock,
        reference=ref_key[1],
        speedup=float(speedup),
        kind=kind,
        ci_low=ci_low,
        ci_high=ci_high,
        verdict=verdict,
        n=len(t),
        n_ref=len(tr),
        paired=paired,
        wins=wins,
        losses=losses,
        ties=ties,
        sign_p=sign_test(wins, losses) if paired else math.nan,
        reached=int(np.isfinite(t).sum()),
        reached_ref=int(np.isfinite(tr).sum()),
        resamples=resamples,
    )


def compare(
    runs: Iterable[Mapping[str, Any]],
    clock: str = "grad_evals",
    reference: str = "adamw",
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[_Key, Comparison]:
    """Every optimizer against ``reference`` (same problem and track) on ``clock``.

    Runs of a problem and track without reference runs get no comparison; the reference is not
    compared with itself. Deterministic: the bootstrap of each cell is seeded from ``seed`` and
    the cell's name.

    Args:
        runs: the store's runs (finished and diverged count; others are misses).
        clock: ``steps``, ``grad_evals`` or ``seconds``.
        reference: the reference optimizer's label.
        resamples: bootstrap resamples (default :data:`RESAMPLES`).
        seed: the bootstrap seed.

    Returns:
        ``(problem, label, track) -> Comparison``.

    Example:
        >>> runs = [dict(problem="p", label=lab, track="tuned", study=s, status="finished",
        ...              ttt_steps=t, steps=100)
        ...         for lab, ts in [("adamw", [40, 44, 48, 52]), ("x", [20, 21, 23, 25])]
        ...         for s, t in enumerate(ts)]
        >>> c = compare(runs, "steps")[("p", "x", "tuned")]
        >>> (round(c.speedup, 2), c.verdict, c.paired, c.wins)
        (2.09, 'faster', True, 4)
    """
    times = study_times(runs, clock)
    out: dict[_Key, Comparison] = {}
    for key in sorted(times):
        ref_key = (key[0], reference, key[2])
        if key[1] == reference or ref_key not in times:
            continue
        out[key] = _compare_cell(key, ref_key, times[key], times[ref_key], clock, resamples, seed)
    return out


@dataclass(frozen=True)
class GeoMean:
    """A geometric-mean speed-up over the problems where both medians reached the target.

    ``value`` is NaN when there is no such problem; ``used`` of ``problems`` problems counted.
    """

    value: float
    used: int
    problems: int


def geomean_speedups(comparisons: Mapping[_Key, Comparison]) -> dict[tuple[str, str], GeoMean]:
    """``(label, track) -> GeoMean`` of the exact speed-ups (both reached), the count stated.

    Example:
        >>> c = lambda p, s, kind: Comparison(p, "x", "tuned", "steps", "adamw", s, kind, 0, 9,
        ...     "", 3, 3, True, 0, 0, 0, 1.0, 3, 3)
        >>> g = geomean_speedups({("p", "x", "tuned"): c("p", 4.0, "exact"),
        ...     ("q", "x", "tuned"): c("q", 1.0, "exact"), ("r", "x", "tuned"): c("r", 0.1, "at_most")})
        >>> g[("x", "tuned")]
        GeoMean(value=2.0, used=2, problems=3)
    """
    logs: dict[tuple[str, str], list[float]] = defaultdict(list)
    total: dict[tuple[str, str], int] = defaultdict(int)
    for c in comparisons.values():
        k = (c.label, c.track)
        total[k] += 1
        if c.kind == "exact" and c.speedup > 0 and math.isfinite(c.speedup):
            logs[k].append(math.log(c.speedup))
    return {
        k: GeoMean(math.exp(sum(logs[k]) / len(logs[k])) if logs[k] else math.nan, len(logs[k]), n)
        for k, n in total.items()
    }


def profile_band(
    runs: Iterable[Mapping[str, Any]],
    clock: str,
    track: str,
    *,
    resamples: int = 200,
    seed: int = 0,
    taus: Sequence[float] | None = None,
    tau_max: float = 4.0,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The performance profiles of ``track`` on ``clock`` with a bootstrap band.

    Each replicate resamples the studies of every (problem, optimizer) cell, takes the medians and
    builds the profiles (:func:`performance_profiles`' rules); the band is the pointwise 2.5–97.5%
    range of the replicates.

    Returns:
        ``(taus, {label: ρ(τ)}, {label: (low, high)})``; ρ is the profile of the data itself.
    """
    grid = np.linspace(1.0, tau_max, 301) if taus is None else np.asarray(taus, dtype=float)
    cells = {k: v for k, v in study_times(runs, clock).items() if k[2] == track}
    problems = sorted({k[0] for k in cells})
    labels = sorted({k[1] for k in cells})
    rng = np.random.default_rng([seed, _seed_of(clock, track)])
    med = np.full((len(labels), len(problems), resamples + 1), np.inf)
    for (p, lab, _), studies in sorted(cells.items()):
        t = np.array([studies[s][0] for s in sorted(studies)])
        idx = rng.integers(0, len(t), size=(resamples, len(t)))
        med[labels.index(lab), problems.index(p), 0] = np.median(t)
        med[labels.index(lab), problems.index(p), 1:] = np.median(t[idx], axis=1)
    best = med.min(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isfinite(med) & np.isfinite(best) & (best > 0), med / best, np.inf)
    ratio = np.where(ratio <= tau_max, ratio, np.inf)
    rho_all = (ratio[..., None] <= grid).mean(axis=1)  # [labels, replicates + 1, taus]
    rho = {lab: rho_all[i, 0] for i, lab in enumerate(labels)}
    band = {
        lab: (
            np.quantile(rho_all[i, 1:], 0.025, axis=0),
            np.quantile(rho_all[i, 1:], 0.975, axis=0),
        )
        for i, lab in enumerate(labels)
    }
    return grid, rho, band
