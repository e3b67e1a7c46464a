"""Targets from a reference, the AlgoPerf way: ``curvlab bench calibrate``.

Rule. For every problem of a suite, run the reference — tuned AdamW (the built-in ``adamw`` entry:
lr, weight decay and β₂ searched by the same scrambled Halton points as the tuned track) with the
suite's tuned schedule (by default 5% linear warm-up, then cosine decay to 0 at the budget) — for
``trials`` configurations on each of ``seeds`` seeds, the full budget each (by default the suite's
own trials: calibration seed ``j`` then runs the very configurations of the tuned track's study
``j``, so the targets are what the suite's tuned AdamW reaches, on other seeds). On seed ``j``, take the
best value of the problem's target metric on its VALIDATION split that any trial reaches at an
evaluation after step 0 and within the first ``fraction`` of the budget; the target is the least
good of these values over the seeds (the median is recorded too). So the reference reaches the
target within ``fraction`` of the budget on every calibration seed, and the tuned track has
``1/fraction`` times that budget to get there. (The median over seeds, tried first, leaves the
reference itself short on half the seeds where the best validation value is a transient dip whose
depth varies with the seed — breast-cancer logistic regression's validation loss: tuned AdamW
then reached the quick suite's target in 1 of 3 studies.) (AlgoPerf sets its targets from the best of a tuned reference within the budget: Dahl et al.
2023, arXiv 2306.07179, §4.2).

The calibration runs use seeds of their own (``1000·seed + 900 + j``, see
:data:`curvlab.bench.suites.SEED_BASES`), disjoint from the seeds on which the suite then measures
time-to-target. The targets, with their provenance (date, reference, trials, seeds, fraction, the
values reached, curvlab/torch versions), are written to the suite's targets file
(:func:`curvlab.bench.suites.targets_path`), which :func:`~curvlab.bench.suites.load_suite` reads.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from curvlab.bench.problems import get_problem
from curvlab.bench.runner import RunOptions, run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import (
    BUILTIN_OPTIMIZERS,
    SEED_BASES,
    TUNED_SCHEDULE,
    Suite,
    expand_runs,
    problem_infos,
)
from curvlab.errors import CalibrationError, InvalidArgumentError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "MAX_CALIBRATION_SEEDS",
    "REFERENCE",
    "Calibration",
    "calibrate",
    "reference_suite",
    "write_targets",
]

#: The reference optimizer entry: tuned AdamW.
REFERENCE = BUILTIN_OPTIMIZERS["adamw"]
#: Most calibration seeds (they must stay below the next track's seeds).
MAX_CALIBRATION_SEEDS = 100


@dataclass
class Calibration:
    """What :func:`calibrate` found: the targets file's content and the notes it printed.

    ``doc`` is ``{"suite", "provenance", "targets": {problem: {metric, higher_is_better,
    threshold, reference_value, per_seed, full_budget_per_seed, budget_steps, within_steps}}}``.
    """

    doc: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def targets(self) -> dict[str, float]:
        """Problem -> calibrated threshold."""
        return {p: float(t["threshold"]) for p, t in self.doc["targets"].items()}


def _best(values: list[float], higher_is_better: bool) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if higher_is_better else min(finite)


def _value(metrics: Mapping[str, Any], name: str) -> float:
    v = metrics.get(name)
    return math.nan if v is None else float(v)


def reference_suite(suite: Suite, trials: int, seeds: int) -> Suite:
    """The suite of the reference's calibration runs for ``suite`` (no targets, own seeds)."""
    return Suite(
        name=f"{suite.name}-calibration",
        problems=suite.problems,
        optimizers=(REFERENCE,),
        seed=suite.seed,
        trials=trials,
        studies=seeds,
        tracks=("calibration",),
        problem_overrides=suite.problem_overrides,
        schedules={"calibration": dict(suite.schedules.get("tuned", TUNED_SCHEDULE))},
    )


def calibrate(
    suite: Suite,
    store_path: str | os.PathLike[str],
    *,
    fraction: float = 0.5,
    trials: int | None = None,
    seeds: int = 3,
    **run_options: Unpack[RunOptions],
) -> Calibration:
    """Run the reference on every problem of ``suite`` into ``store_path`` and set the targets.

    Args:
        suite: the suite to calibrate (its own targets, if any, are checked against the reference).
        store_path: SQLite store of the calibration runs (resumable like any run).
        fraction: the share of the budget within which the reference must reach the target, in
            ``(0, 1]``.
        trials: reference configurations per seed (default: the suite's tuned trials, so that
            calibration seed ``j`` runs exactly the configurations of the tuned track's study
            ``j``); never fewer than the suite's trials.
        seeds: calibration seeds (studies), 1 to :data:`MAX_CALIBRATION_SEEDS`; odd numbers make
            the median one seed's value.
        run_options: ``workers``, ``progress``, ``log``, ``executor``, ``address``: passed on to
            :func:`curvlab.bench.runner.run_suite` (:class:`~curvlab.bench.runner.RunOptions`).

    Returns:
        A :class:`Calibration` (write it with :func:`write_targets`).

    Raises:
        InvalidArgumentError: a fraction outside ``(0, 1]``, fewer trials than the suite's, or a
            seed count out of range.
        CalibrationError: the reference produced no finite value of a problem's metric on any
            seed (every run diverged or failed).
    """
    say = run_options.get("log") or (lambda m: None)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise InvalidArgumentError(f"fraction must be in (0, 1], got {fraction!r}")
    n_trials = suite.trials if trials is None else trials
    if n_trials < suite.trials:
        raise InvalidArgumentError(
            f"trials ({n_trials}) is below the suite's tuned trials ({suite.trials}); the reference "
            "gets the suite's trial budget or more"
        )
    if not 1 <= seeds <= MAX_CALIBRATION_SEEDS:
        raise InvalidArgumentError(f"seeds must be 1 to {MAX_CALIBRATION_SEEDS}, got {seeds}")
    ref = reference_suite(suite, n_trials, seeds)
    t0 = time.time()
    result = run_suite(ref, store_path, **run_options)
    infos = problem_infos(ref)
    specs = expand_runs(ref, infos)
    st = Store(store_path, readonly=True)
    try:
        rows = {r["run_id"]: r for r in st.runs(suite=ref.name)}
        evals = {s.run_id: st.evals(s.run_id) for s in specs}
    finally:
        st.close()
    targets: dict[str, Any] = {}
    notes: list[str] = []
    for p in suite.problems:
        target = get_problem(p).target
        hib = target.higher_is_better
        budget = int(infos[p]["budget_steps"])
        within = max(1, math.floor(fraction * budget))
        per_seed, full = [], []
        for j in range(seeds):
            mine = [s for s in specs if s.problem == p and s.study == j]
            # the evaluation at step 0 (the initialisation) is nothing the reference reached
            trained = [[e for e in evals[s.run_id] if e["step"] > 0] for s in mine]
            values = [[_value(e["metrics"], target.metric) for e in es] for es in trained]
            steps = [[int(e["step"]) for e in es] for es in trained]
            per_seed.append(
                _best(
                    [v for vs, ss in zip(values, steps) for v, t in zip(vs, ss) if t <= within],
                    hib,
                )
            )
            full.append(_best([v for vs in values for v in vs], hib))
        finite = [v for v in per_seed if math.isfinite(v)]
        if not finite:
            bad = [rows.get(s.run_id, {}).get("status") for s in specs if s.problem == p]
            raise CalibrationError(
                f"{p}: the reference (tuned AdamW) reached no finite {target.metric} within "
                f"{within} of {budget} steps on any of {seeds} seeds (run statuses: "
                f"{', '.join(sorted({str(b) for b in bad}))}); give the problem a larger budget "
                "or check it with `curvlab bench run`"
            )
        value = min(finite) if hib else max(finite)  # every seed reaches it
        reached = sum(1 for v in full if math.isfinite(v) and (v >= value if hib else v <= value))
        targets[p] = {
            "metric": target.metric,
            "higher_is_better": hib,
            "threshold": value,
            "reference_value": value,
            "median_over_seeds": float(statistics.median(finite)),
            "per_seed": per_seed,
            "full_budget_per_seed": full,
            "budget_steps": budget,
            "within_steps": within,
            "seeds_reaching_in_budget": reached,
        }
        notes.append(
            f"{p}: target {target.metric} {'>=' if hib else '<='} {value:.6g} (least good over "
            f"{len(finite)} seeds of the best of {n_trials} trials within {within}/{budget} steps;"
            f" {reached}/{seeds} seeds reach it in the full budget)"
        )
        old = suite.targets.get(p)
        if old is not None:
            best = _best(full, hib)
            short = (old - best) if hib else (best - old)
            notes.append(
                f"{p}: the suite's own target {old:g} is "
                + (
                    f"never reached by the reference: its best is {best:g}, short by {short:g}"
                    if short > 0
                    else f"reached by the reference (best {best:g})"
                )
            )
    for n in notes:
        say(n)
    from curvlab import __version__

    doc = {
        "suite": suite.name,
        "provenance": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
            "reference": {
                "label": REFERENCE.label,
                "optimizer": REFERENCE.optimizer,
                "fixed": dict(REFERENCE.fixed),
                "search": {k: _dim(v) for k, v in REFERENCE.search.items()},
                **ref.schedules["calibration"],
            },
            "trials": n_trials,
            "seeds": [suite.seed * 1000 + SEED_BASES["calibration"] + j for j in range(seeds)],
            "fraction": float(fraction),
            "rule": "least good over seeds of the best validation value any trial reaches "
            "within fraction x budget (after step 0)",
            "runs": {
                "total": result.total,
                "finished": result.finished + result.already_done,
                "diverged": result.diverged,
                "failed": result.failed,
            },
            "seconds": round(time.time() - t0, 1),
            "curvlab": __version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        "targets": targets,
    }
    return Calibration(doc, notes)


def _dim(d: Any) -> Any:
    return list(d.choices) if d.choices else {"low": d.low, "high": d.high, "log": d.log}


def write_targets(cal: Calibration, path: str | os.PathLike[str]) -> Path:
    """Write the calibration to the suite's targets file ``path`` (YAML, atomically)."""
    import yaml

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    header = (
        "# Calibrated targets of the suite (written by `curvlab bench calibrate`; see\n"
        "# curvlab.bench.calibrate for the rule). Rerun calibrate rather than editing.\n"
    )
    tmp.write_text(header + yaml.safe_dump(_plain(cal.doc), sort_keys=False, width=100))
    os.replace(tmp, out)
    return out


def _plain(x: Any) -> Any:
    """Plain YAML-safe data (NaN stays a float, tuples become lists)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
