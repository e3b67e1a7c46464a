"""What a benchmark run supports, in a few sentences generated from its numbers.

The sentences follow :mod:`curvlab.bench.scoring`'s rules: a claim ("faster", "slower") is made
only when the 95% bootstrap interval of the speed-up over the reference excludes 1, on the
gradient-equivalent clock (the primary one; steps and seconds are in the report's tables). What
the run does not support is said as plainly: no detectable difference, targets the reference never
reached, too few studies for a paired test, tuned results worse than the defaults, and a wall clock
measured under a load above the core count.

Example::

    from curvlab.bench.report import conclusion
    print("\\n".join(conclusion("out/store.sqlite")))
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from curvlab.bench.scoring import RESAMPLES, Comparison, compare, final_quality
from curvlab.bench.store import Store, run_loads

__all__ = ["Conclusion", "conclusion", "high_load", "statements", "tuned_worse_than_defaults"]

#: Statements of one kind listed before the rest are counted ("... and 3 more").
MAX_LISTED = 8
_CLOCK_WORDS = {"steps": "steps", "grad_evals": "gradient-equivalents", "seconds": "seconds"}
_TRACK_WORD = {"tuned": "tuned", "defaults": "default"}


@dataclass(frozen=True)
class Conclusion:
    """The run's conclusion: what it supports and what it does not, as sentences."""

    supports: list[str]
    does_not_support: list[str]

    def lines(self) -> list[str]:
        """Both parts, supported statements first."""
        return [*self.supports, *self.does_not_support]


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x):
        return "∞"
    return f"{x:.2g}" if abs(x) < 10 else f"{x:.3g}"


def _ci(c: Comparison) -> str:
    close = ")" if math.isinf(c.ci_high) else "]"
    return f"95% CI [{_num(c.ci_low)}, {_num(c.ci_high)}{close}"


def _studies(c: Comparison) -> str:
    if c.paired:
        return f"{c.n} paired studies, sign test p = {c.sign_p:.2g}"
    return f"{c.n} vs {c.n_ref} studies, unpaired"


def _claim(c: Comparison) -> str:
    tw = _TRACK_WORD.get(c.track, c.track)
    who, ref, clock = f"{tw} {c.label}", f"{tw} {c.reference}", _CLOCK_WORDS[c.clock]
    s = _num(c.speedup)
    if c.verdict == "faster" and c.kind == "at_least":
        return (
            f"On {c.problem}, {who} reaches the target in most studies and {ref} does not: at "
            f"least {s}x faster in {clock}, {_ci(c)} ({_studies(c)})."
        )
    if c.verdict == "faster":
        return (
            f"On {c.problem}, {who} reaches the target {s}x faster than {ref} in {clock}, "
            f"{_ci(c)} ({_studies(c)})."
        )
    if c.kind == "at_most":
        return (
            f"On {c.problem}, {who} does not reach the target in most studies ({c.reached}/{c.n}) "
            f"and {ref} does: speed-up at most {s} in {clock}, {_ci(c)} ({_studies(c)})."
        )
    return (
        f"On {c.problem}, {who} is slower than {ref}: it reaches the target in {_num(1 / c.speedup)}"
        f"x the {clock} (speed-up {s}, {_ci(c)}; {_studies(c)})."
    )


def _listed(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f"; and {more} more (see the tables)" if more > 0 else "")


def high_load(runs: Sequence[Mapping[str, Any]]) -> tuple[int, int, float, int]:
    """``(runs under high load, runs with a load record, largest load, cores)``.

    A run's load is its ``load1`` column (the larger 1-minute load average of its start and end)
    or, in older stores, the same figure from its ``env``; it is high when it exceeds the
    machine's core count (more runnable processes than cores: the seconds clock then measures
    the queue as much as the optimizer).
    """
    high = seen = 0
    worst, cores = 0.0, 0
    for r in runs:
        env = r.get("env") or {}
        load = r.get("load1")
        if load is None:
            both = run_loads(env)
            load = max(both) if both else None
        if load is None:
            continue
        n_cpu = int(env.get("cpu_count") or os.cpu_count() or 1)
        seen += 1
        worst, cores = max(worst, float(load)), max(cores, n_cpu)
        high += float(load) > n_cpu
    return high, seen, worst, cores


def tuned_worse_than_defaults(
    runs: Sequence[Mapping[str, Any]], problems: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, float, float]]:
    """``(problem, label, tuned mean, defaults mean)`` where tuning ended worse than the defaults.

    The final metric's mean over studies' best trials (tuned) and over seeds (defaults), in the
    problem's direction; a sign that the search space or the trial budget misses the defaults.
    """
    hib = {p: bool(i.get("higher_is_better")) for p, i in problems.items()}
    fq = final_quality(runs, hib)
    out = []
    for (p, lab, track), q in sorted(fq.items()):
        d = fq.get((p, lab, "defaults"))
        if track != "tuned" or d is None or not math.isfinite(d["mean"]):
            continue
        # a tuned cell whose every study diverged is worse than any finite default
        worst = -math.inf if hib.get(p) else math.inf
        t = q["mean"] if math.isfinite(q["mean"]) else worst
        if (t < d["mean"]) if hib.get(p) else (t > d["mean"]):
            out.append((p, lab, q["mean"], d["mean"]))
    return out


def statements(
    runs: Sequence[Mapping[str, Any]],
    problems: Mapping[str, Mapping[str, Any]],
    *,
    reference: str = "adamw",
    clock: str = "grad_evals",
    resamples: int = RESAMPLES,
    comparisons: Mapping[Any, Comparison] | None = None,
    worse: Sequence[tuple[str, str, float, float]] | None = None,
) -> Conclusion:
    """The conclusion of ``runs`` (store rows) against ``reference`` on ``clock``.

    Args:
        runs: the store's runs (``Store.runs()``).
        problems: the store's problem infos (``Store.problems()``).
        reference: the reference optimizer's label (tuned AdamW in shipped suites).
        clock: the clock of the claims (default: gradient-equivalents).
        resamples: bootstrap resamples of every interval.
        comparisons: ``compare(done, clock, reference, resamples=resamples)`` when the caller
            has it already (the report does), so that its bootstrap is not run twice.
        worse: ``tuned_worse_than_defaults(done, problems)`` when the caller has it already.

    Returns:
        A :class:`Conclusion`.
    """
    done = [r for r in runs if r["status"] in ("finished", "diverged")]
    cmp = (
        compare(done, clock, reference, resamples=resamples) if comparisons is None else comparisons
    )
    order = {"tuned": 0, "defaults": 1}
    cells = sorted(cmp.values(), key=lambda c: (order.get(c.track, 2), c.problem, c.label))
    claims = [_claim(c) for c in cells if c.verdict in ("faster", "slower")]
    n_studies = sorted({c.n for c in cells})
    span = "-".join(str(n) for n in sorted({n_studies[0], n_studies[-1]})) if n_studies else "0"
    head = (
        f"This run ({len(runs)} runs on {len({r['problem'] for r in runs})} problems; "
        f"{span} studies per cell) supports {len(claims)} statement"
        f"{'' if len(claims) == 1 else 's'} at 95% confidence in {_CLOCK_WORDS[clock]} "
        f"(percentile bootstrap over studies, {resamples} resamples; verdicts from the interval, "
        "never from the point estimate)" + (":" if claims else ".")
    )
    nots: list[str] = []
    if not any(r["label"] == reference for r in done):
        nots.append(f"No finished {reference} runs: no ratio to the reference can be stated.")
    same = [
        f"{_TRACK_WORD.get(c.track, c.track)} {c.label} on {c.problem} "
        f"[{_num(c.ci_low)}, {_num(c.ci_high)}]"
        for c in cells
        if c.verdict == "no detectable difference"
    ]
    if same:
        nots.append(
            f"No detectable difference from {reference} in {_CLOCK_WORDS[clock]} (the 95% "
            f"interval includes 1): {_listed(same)}."
        )
    ref_missed = sorted(
        {
            (c.problem, c.track, c.reached_ref, c.n_ref)
            for c in cells
            if c.kind in ("at_least", "undefined")
        }
    )
    if ref_missed:
        items = [
            f"{p} ({_TRACK_WORD.get(t, t)}, {k}/{n} studies reached)" for p, t, k, n in ref_missed
        ]
        nots.append(
            f"The reference {reference} did not reach the target (median over studies) on: "
            f"{_listed(items)}; ratios to it there are bounds at best."
        )
    neither = [f"{c.label} on {c.problem}" for c in cells if c.verdict == "neither reached"]
    if neither:
        nots.append(
            f"Neither the optimizer nor {reference} reached the target: {_listed(neither)}."
        )
    paired = [c.n for c in cells if c.paired]
    few = [c for c in cells if c.verdict == "too few studies"]
    if few:
        nots.append(
            "Too few studies for an interval (fewer than 2 on a side): "
            f"{_listed([f'{c.label} on {c.problem}' for c in few])}."
        )
    if paired and min(paired) < 6:
        n = min(paired)
        nots.append(
            f"Too few seeds for a paired test: with {n} paired studies the sign test cannot reach "
            f"p < 0.05 (its smallest p is {2.0 ** (1 - n):.2g}); the intervals rest on {n} studies "
            "each and are wide."
        )
    if worse is None:
        worse = tuned_worse_than_defaults(done, problems)
    if worse:
        items = [f"{lab} on {p} ({_num(t)} vs {_num(d)})" for p, lab, t, d in worse]
        nots.append(
            f"Tuned worse than defaults (final metric, tuned vs defaults): {_listed(items)}; the "
            "search space or the trial budget misses the defaults."
        )
    high, seen, worst, cores = high_load(runs)
    if high:
        nots.append(
            f"Wall-clock is unreliable: the 1-minute load average exceeded the {cores} cores in "
            f"{high} of {seen} runs (max {worst:.1f}); compare on steps and gradient-equivalents."
        )
    return Conclusion([head, *claims], nots)


def conclusion(store: Store | str | os.PathLike[str]) -> list[str]:
    """The conclusion of a store as sentences (what it supports, then what it does not).

    Args:
        store: an open :class:`~curvlab.bench.store.Store` or the path of one (opened read-only).

    Returns:
        The sentences, for printing one per line.

    Raises:
        StoreError: no store at the path, or one written by a newer schema.
    """
    st = store if isinstance(store, Store) else Store(store, readonly=True)
    try:
        runs, problems = st.runs(), st.problems()
    finally:
        if st is not store:
            st.close()
    return statements(runs, problems).lines()
