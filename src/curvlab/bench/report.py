"""The benchmark report: one self-contained HTML page and a Markdown twin, from a store.

Contents: per problem, the metric against each clock (steps, gradient-equivalents, seconds) with
the median and the min–max spread over seeds (defaults track) or over studies' best trials (tuned
track), the time-to-target and final-quality table, and the learning-rate sensitivity curve;
overall, the performance profiles and the geometric-mean speed-up over tuned AdamW; the measurement
environment. Figures are matplotlib (Agg) PNGs written under ``figures/``; the HTML embeds them as
``data:`` URIs so the single file can be mailed or archived, the Markdown links the files.
"""

from __future__ import annotations

import base64
import html
import math
import os
import platform
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curvlab.bench.conclusion import (
    conclusion,
    high_load,
    statements,
    tuned_worse_than_defaults,
)
from curvlab.bench.scoring import (
    CLOCKS,
    RESAMPLES,
    Comparison,
    compare,
    final_quality,
    geomean_speedups,
    lr_sensitivity,
    profile_band,
    time_to_target,
)
from curvlab.bench.store import Store, run_loads

__all__ = ["conclusion", "write_report"]

_CLOCK_LABEL = {"steps": "steps", "grad_evals": "gradient-equivalents", "seconds": "seconds"}


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    x = float(x)
    if math.isinf(x):
        return "miss"
    if math.isnan(x):
        return "–"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-2):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def _curves(
    runs: Sequence[Mapping[str, Any]],
    evals_by_run: Mapping[str, list[dict[str, Any]]],
    metric: str,
    track: str,
    hib: bool,
) -> dict[str, dict[str, np.ndarray]]:
    """label -> {step, x_<clock> (median), y_med, y_lo, y_hi} over seeds / studies' best trials."""
    by_label: dict[str, dict[int, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["track"] == track:
            by_label[r["label"]][int(r["study"])].append(r)
    out: dict[str, dict[str, np.ndarray]] = {}
    for label, studies in by_label.items():
        chosen = []
        for members in studies.values():
            ok = [m for m in members if m["status"] == "finished" and m["final_metric"] is not None]
            if not ok:
                ok = members
            key = (
                (lambda m: -(m["final_metric"] or -math.inf))
                if hib
                else (lambda m: m["final_metric"] if m["final_metric"] is not None else math.inf)
            )
            chosen.append(min(ok, key=key))
        series = [evals_by_run.get(m["run_id"], []) for m in chosen]
        series = [s for s in series if s]
        if not series:
            continue
        steps = sorted({e["step"] for s in series for e in s})
        table: dict[str, list[list[float]]] = {c: [] for c in ("y", *CLOCKS)}
        for st in steps:
            ys: list[float] = []
            xs: dict[str, list[float]] = {c: [] for c in CLOCKS}
            for s in series:
                e = next((e for e in s if e["step"] == st), None)
                if e is None:
                    continue
                v = e["metrics"].get(metric)
                ys.append(math.nan if v is None else float(v))
                for c in CLOCKS:
                    xs[c].append(float(e["step"] if c == "steps" else e[c]))
            table["y"].append(ys)
            for c in CLOCKS:
                table[c].append(xs[c])
        cur = {
            "y_med": np.array(
                [np.nanmedian(v) if np.isfinite(v).any() else np.nan for v in table["y"]]
            ),
            "y_lo": np.array(
                [np.nanmin(v) if np.isfinite(v).any() else np.nan for v in table["y"]]
            ),
            "y_hi": np.array(
                [np.nanmax(v) if np.isfinite(v).any() else np.nan for v in table["y"]]
            ),
        }
        for c in CLOCKS:
            cur[c] = np.array([np.median(v) for v in table[c]])
        out[label] = cur
    return out


def _problem_figure(
    path: Path,
    name: str,
    info: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    evals_by_run: Mapping[str, list[dict[str, Any]]],
    tracks: Sequence[str],
    colors: Mapping[str, Any],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = info["target_metric"]
    hib = bool(info["higher_is_better"])
    fig, axes = plt.subplots(len(tracks), 3, figsize=(13, 3.4 * len(tracks)), squeeze=False)
    for i, track in enumerate(tracks):
        curves = _curves(runs, evals_by_run, metric, track, hib)
        for j, clock in enumerate(CLOCKS):
            ax = axes[i][j]
            for label, cur in sorted(curves.items()):
                ax.plot(
                    cur[clock], cur["y_med"], label=_plot_label(label), color=colors[label], lw=1.5
                )
                ax.fill_between(
                    cur[clock], cur["y_lo"], cur["y_hi"], color=colors[label], alpha=0.18, lw=0
                )
            ax.axhline(float(info["target_threshold"]), color="k", ls="--", lw=0.8)
            allpos = all((np.nan_to_num(c["y_lo"], nan=1.0) > 0).all() for c in curves.values())
            if not hib and allpos and curves:
                ax.set_yscale("log")
            ax.set_xlabel(_CLOCK_LABEL[clock])
            ax.set_ylabel(metric)
            ax.set_title(f"{track} track", fontsize=9)
            ax.grid(alpha=0.3)
            _clip_axis(
                ax,
                [y for c in curves.values() for k in ("y_lo", "y_med", "y_hi") for y in c[k]],
                ax.get_yscale() == "log",
            )
    fig.suptitle(
        _plot_label(f"{name}: {metric} (median, min–max band; dashed: target)"), fontsize=10
    )
    # fixed margins: tight_layout costs seconds per figure on a loaded CPU
    fig.subplots_adjust(
        left=0.06, right=0.99, top=0.9, bottom=0.12 / len(tracks) + 0.02, wspace=0.28, hspace=0.45
    )
    _legend_outside(fig, axes[0][0])
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


#: Monitor numbers plotted next to the loss curves, with their axis labels.
_MONITOR_PLOTS = {
    "sharpness/ratio": "λ_max·η/2 (GD stability: 1)",
    "sharpness/value": "λ_max(H)",
    "adam_sharpness/preconditioned_ratio": "λ_max(P⁻¹H)/threshold (1: edge)",
    "noise_scale/b_simple": "B_simple (critical batch)",
}


def _monitor_figure(
    path: Path,
    name: str,
    runs: Sequence[Mapping[str, Any]],
    monitors: Mapping[str, list[dict[str, Any]]],
    colors: Mapping[str, Any],
) -> bool:
    """Median over a label's runs (defaults track first) of each recorded monitor number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    track = (
        "defaults"
        if any(r["track"] == "defaults" and monitors.get(r["run_id"]) for r in runs)
        else "tuned"
    )
    for r in runs:
        if r["track"] != track:
            continue
        for m in monitors.get(r["run_id"], []):
            if m["name"] in _MONITOR_PLOTS and m["value"] is not None:
                series[m["name"]][r["label"]][int(m["step"])].append(float(m["value"]))
    names = [n for n in _MONITOR_PLOTS if n in series]
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names) + 1.8, 3.2), squeeze=False)
    for ax, n in zip(axes[0], names):
        values = []
        for label, by_step in sorted(series[n].items()):
            steps = sorted(by_step)
            med = [float(np.median(by_step[st])) for st in steps]
            values += med
            ax.plot(steps, med, "o-", ms=3, lw=1.2, color=colors[label], label=_plot_label(label))
        log = bool(values) and min(values) > 0
        if log:
            ax.set_yscale("log")
        _clip_axis(ax, values, log)
        if n.endswith("ratio"):
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(_MONITOR_PLOTS[n], fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(_plot_label(f"{name}: monitors, {track} track (median over runs)"), fontsize=10)
    _legend_outside(fig, axes[0][0])
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def _robust_limits(values: Sequence[float], log: bool) -> tuple[float, float] | None:
    """Axis limits that hold the bulk of ``values`` and not a runaway one.

    The rule: within the data's range, at most 3 interquartile ranges beyond the quartiles (in
    log10 when ``log``); a DoG run that ends at 1e172 no longer sets the axis. ``None`` when no
    finite (positive, for ``log``) value exists.

    Example:
        >>> _robust_limits([1.0, 1.5, 2.0, 2.5, 3.0, 1e172], log=False)
        (1.0, 3.0)
        >>> _robust_limits([1.0, 2.0], log=False)
        (1.0, 2.0)
    """
    v = np.asarray([x for x in values if math.isfinite(x) and (x > 0 or not log)], dtype=float)
    if v.size == 0:
        return None
    t = np.log10(v) if log else v
    q1, q3 = np.percentile(t, [25, 75])
    span = q3 - q1
    inside = v[(t >= q1 - 3 * span) & (t <= q3 + 3 * span)]
    return float(inside.min()), float(inside.max())


def _clip_axis(ax: Any, values: Sequence[float], log: bool) -> tuple[float, float] | None:
    """Set ``ax``'s y-limits to the robust range (a 5% margin); returns the limits, if any."""
    lim = _robust_limits(values, log)
    if lim is None:
        return None
    lo, hi = lim
    if log:
        pad = (hi / lo) ** 0.05 if hi > lo else 2.0
        ax.set_ylim(lo / pad, hi * pad)
    else:
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
        ax.set_ylim(lo - pad, hi + pad)
    return lim


def _lr_figure(
    path: Path,
    name: str,
    info: Mapping[str, Any],
    data: Mapping[str, list[tuple[float, float]]],
    colors: Mapping[str, Any],
) -> list[str]:
    """Draw the LR-sensitivity plot; returns the points clipped to the axis (``label at lr``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 3.4))
    hib = bool(info["higher_is_better"])
    vals = [y for pts in data.values() for _, y in pts if math.isfinite(y)]
    log = not hib and bool(vals) and min(vals) > 0
    if log:
        ax.set_yscale("log")
    lim = _clip_axis(ax, vals, log)
    top = ax.get_ylim()[1]
    clipped = []
    for label, pts in sorted(data.items()):
        lo, hi = lim if lim is not None else (-math.inf, math.inf)
        shown = [(x, min(max(y, lo), hi)) for x, y in pts if math.isfinite(y)]
        color = colors[label]
        if shown:
            ax.plot(*zip(*shown), "o-", label=_plot_label(label), color=color, ms=4, lw=1)
        for x, y in pts:
            if math.isfinite(y) and not lo <= y <= hi:
                clipped.append(f"{label} at lr {x:.3g}: {y:.3g}")
                ax.plot([x], [hi if y > hi else lo], "^" if y > hi else "v", color=color, ms=8)
        bad = [x for x, y in pts if not math.isfinite(y)]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, ms=7)
    ax.set_xscale("log")
    ax.axhline(float(info["target_threshold"]), color="k", ls="--", lw=0.8)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final {info['final_metric']}")
    ax.set_title(
        _plot_label(
            f"{name}: learning-rate sensitivity (tuned; x: diverged; ▲▼: clipped to the axis)"
        ),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return clipped


def _profile_figure(
    path: Path, profiles: Mapping[str, tuple[Any, Any, Any]], colors: Mapping[str, Any]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(profiles)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys) + 1.8, 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        grid, rho, band = profiles[key]
        for label in sorted(rho):
            ax.step(grid, rho[label], where="post", label=_plot_label(label), color=colors[label])
            lo, hi = band[label]
            ax.fill_between(grid, lo, hi, step="post", color=colors[label], alpha=0.15, lw=0)
        ax.set_xlabel("τ (ratio to the fastest)")
        ax.set_ylabel("fraction of problems")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes[0][0])
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _legend_outside(fig: Any, ax: Any) -> None:
    """One legend for the figure, right of the axes (never over the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)


def _md(text: Any) -> str:
    """``text`` safe inside Markdown: HTML and Markdown syntax escaped, one line."""
    out = html.escape(" ".join(str(text).split()), quote=False)
    for c in "\\`*_[]|":
        out = out.replace(c, "\\" + c)
    return out


def _plot_label(label: str) -> str:
    """``label`` as matplotlib shows it literally (no mathtext, not hidden by a leading ``_``)."""
    return (" " if label.startswith("_") else "") + label.replace("$", r"\$")


_Block = tuple[str, str]  # (HTML, Markdown)


def _heading(level: int, text: str, anchor: str | None = None) -> _Block:
    attr = f' id="{anchor}"' if anchor else ""
    return f"<h{level}{attr}>{html.escape(text)}</h{level}>", f"{'#' * level} {_md(text)}"


def _para(text: str, note: bool = False) -> _Block:
    html_text = f"<p{' class=note' if note else ''}>{html.escape(text)}</p>"
    return html_text, (f"_{text}_" if note else _md(text))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> _Block:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    lines = ["| " + " | ".join(_md(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>", "\n".join(lines)


def _image(title: str, path: Path) -> _Block:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>",
        f"![{_md(title)}](figures/{path.name})",
    )


class _Doc:
    """The report as it grows: HTML parts and their Markdown twins, side by side."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def add(self, *blocks: _Block) -> None:
        """Append ``blocks`` as one part (HTML run together, Markdown a blank line apart)."""
        self.html.append("".join(b[0] for b in blocks))
        self.md.append("\n\n".join(b[1] for b in blocks))


class _Data:
    """What the report is made of: the store's records and the scores computed from them."""

    def __init__(self, store_path: str | os.PathLike[str], figs: Path) -> None:
        store = Store(store_path, readonly=True)
        try:
            self.runs = store.runs()
            evals = store.evals()
            self.monitors: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for m in store.monitor_values():
                self.monitors[m["key"]].append(m)
            self.problems = store.problems()
            self.suites = store.suites()
        finally:
            store.close()
        self.store_path = os.fspath(store_path)
        self.figs = figs
        self.evals_by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in evals:
            self.evals_by_run[e["run_id"]].append(e)
        done = [r for r in self.runs if r["status"] in ("finished", "diverged")]
        self.labels = sorted({r["label"] for r in self.runs})
        self.tracks = [t for t in ("defaults", "tuned") if any(r["track"] == t for r in self.runs)]
        import matplotlib

        matplotlib.use("Agg")
        cmap = matplotlib.colormaps["tab10"]
        self.colors = {lab: cmap(i % 10) for i, lab in enumerate(self.labels)}
        hib = {p: bool(i["higher_is_better"]) for p, i in self.problems.items()}
        self.ttt = {c: time_to_target(done, c) for c in CLOCKS}
        self.fq = final_quality(done, hib)
        self.cmp = {c: compare(done, c) for c in CLOCKS}
        self.lrs = lr_sensitivity(done)
        self.done = done
        worse = tuned_worse_than_defaults(done, self.problems)
        # the report's own comparisons (the same seeded bootstrap) feed the conclusion
        self.conclusion = statements(
            self.runs, self.problems, comparisons=self.cmp["grad_evals"], worse=worse
        )
        self.worse = {(p, lab) for p, lab, _, _ in worse}
        self.high_load = high_load(self.runs)


def _intro_section(doc: _Doc, d: _Data) -> None:
    status_count: dict[str, int] = defaultdict(int)
    for r in d.runs:
        status_count[r["status"]] += 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(status_count.items()))
    doc.add(_heading(1, "curvlab benchmark report"))
    _conclusion_section(doc, d)
    doc.add(_heading(2, "Run"))
    intro = (
        f"Store {d.store_path}; suites: {', '.join(sorted(d.suites)) or '–'}; "
        f"{len(d.runs)} runs ({summary}); optimizers: {', '.join(d.labels)}; problems: "
        f"{', '.join(sorted(d.problems))}."
    )
    skipped = sorted({o for sd in d.suites.values() for o in sd.get("skipped_optimizers", [])})
    if skipped:
        intro += f" Skipped (not in this installation's optimizer registry): {', '.join(skipped)}."
    doc.add(_para(intro))
    rules = (
        "Time-to-target: per study the fastest trial reaching the target, median over studies "
        "(defaults track: each seed is a study); 'miss' = not reached within the budget. Clocks: "
        "optimizer steps, gradient-equivalents (gradient 1, Hessian-vector product 2, GNB pass 1), "
        "seconds of training (evaluation off the clock). Final quality: mean ± std over seeds "
        "(defaults) or over the studies' best trials (tuned)."
    )
    doc.add(_para(rules, note=True))


def _conclusion_section(doc: _Doc, d: _Data) -> None:
    doc.add(_heading(2, "Conclusion"))
    doc.add(*[_para(line) for line in d.conclusion.supports])
    if d.conclusion.does_not_support:
        doc.add(_heading(3, "What this run does not support"))
        doc.add(*[_para(line) for line in d.conclusion.does_not_support])


def _ratio(c: Comparison) -> str:
    mark = {"at_most": "≤ ", "at_least": "≥ "}.get(c.kind, "")
    return "neither reached" if c.kind == "undefined" else mark + _fmt(c.speedup)


def _interval(c: Comparison) -> str:
    return f"[{_fmt(c.ci_low)}, {'∞' if math.isinf(c.ci_high) else _fmt(c.ci_high)}]"


def _overall_section(doc: _Doc, d: _Data) -> None:
    doc.add(_heading(2, "Overall"))
    profiles = {}
    for track in d.tracks:
        for clock in ("steps", "grad_evals"):
            grid, rho, band = profile_band(d.done, clock, track)
            if rho:
                profiles[f"{track} track, {_CLOCK_LABEL[clock]}"] = (grid, rho, band)
    if profiles:
        pf = d.figs / "performance_profiles.png"
        _profile_figure(pf, profiles, d.colors)
        title = (
            "Performance profiles (ρ(τ): fraction of problems within τ× of the fastest median; "
            "band: 95% pointwise bootstrap range over studies)"
        )
        doc.add(_image(title, pf))
    cmp = d.cmp["grad_evals"]
    if not cmp:
        doc.add(
            _heading(3, "Speed-up over AdamW"),
            _table(["note"], [["no AdamW runs to compare with in the store: no speed-up table"]]),
        )
        return
    unreliable = " (unreliable: high load)" if d.high_load[0] else ""
    header = ["problem", "optimizer", "track"]
    for clock in CLOCKS:
        note = unreliable if clock == "seconds" else ""
        header += [f"speed-up ({_CLOCK_LABEL[clock]}{note})", "95% CI"]
    header += ["verdict (gradient-equivalents)", "studies (wins/losses/ties)", "sign test p"]
    rows = []
    for key, c in cmp.items():
        cells = [d.cmp[k][key] for k in CLOCKS]
        rows.append(
            [
                *key,
                *[x for cc in cells for x in (_ratio(cc), _interval(cc))],
                c.verdict,
                f"{c.n} ({c.wins}/{c.losses}/{c.ties})" if c.paired else f"{c.n} vs {c.n_ref}",
                _fmt(c.sign_p),
            ]
        )
    title = (
        "Speed-up over AdamW of the same track, per problem (median over studies of AdamW's "
        "time / the optimizer's; >1: faster; ≤/≥: a bound where a median missed the target; "
        f"percentile bootstrap over studies, {RESAMPLES} resamples, paired where the studies "
        "share seeds; exact two-sided sign test on the paired studies)"
    )
    doc.add(_heading(3, title), _table(header, rows))
    geo = {c: geomean_speedups(d.cmp[c]) for c in CLOCKS}
    header = ["optimizer", "track", *[f"geometric mean ({_CLOCK_LABEL[c]})" for c in CLOCKS]]
    rows = [
        [
            lab,
            track,
            *[
                f"{_fmt(geo[c][(lab, track)].value)} over {geo[c][(lab, track)].used} of "
                f"{geo[c][(lab, track)].problems}"
                for c in CLOCKS
            ],
        ]
        for (lab, track) in sorted(geo["grad_evals"])
    ]
    title = (
        "Geometric-mean speed-up over AdamW, only over the problems where both medians reached "
        "the target (count stated; misses are never imputed)"
    )
    doc.add(_heading(3, title), _table(header, rows))


def _problem_section(doc: _Doc, d: _Data, p: str) -> None:
    info = d.problems[p]
    prun = [r for r in d.runs if r["problem"] == p]
    if not prun:
        return
    direction = "≥" if info["higher_is_better"] else "≤"
    desc = (
        f"{info['description']}. Target: {info['target_metric']} {direction} "
        f"{info['target_threshold']:g}; "
        f"budget {info['budget_steps']} steps (tuned), evaluation every {info['eval_every']} "
        f"steps; "
        f"data: {info['data']}."
    )
    doc.add(_heading(2, p, anchor=_slug(p)), _para(desc))
    header = [
        "optimizer",
        "track",
        "runs",
        "diverged",
        "steps to target",
        "grad-evals to target",
        "seconds to target" + (" (unreliable: high load)" if d.high_load[0] else ""),
        f"final {info['final_metric']} (mean ± std)",
    ]
    rows = []
    for lab in d.labels:
        for track in d.tracks:
            rs = [r for r in prun if r["label"] == lab and r["track"] == track]
            if not rs:
                continue
            key = (p, lab, track)
            q = d.fq.get(key, {"mean": math.nan, "std": math.nan, "diverged": 0})
            rows.append(
                [
                    lab,
                    track,
                    str(len(rs)),
                    str(sum(r["status"] == "diverged" for r in rs)),
                    *[_fmt(d.ttt[c].get(key, math.inf)) for c in CLOCKS],
                    f"{_fmt(q['mean'])} ± {_fmt(q['std']) if math.isfinite(q['std']) else '∞'}"
                    + (
                        " ⚠ tuned worse than defaults"
                        if (p, lab) in d.worse and track == "tuned"
                        else ""
                    ),
                ]
            )
    doc.add(_table(header, rows))
    f1 = d.figs / f"{_slug(p)}_curves.png"
    _problem_figure(f1, p, info, prun, d.evals_by_run, d.tracks, d.colors)
    doc.add(_image(f"{p}: {info['target_metric']} against each clock", f1))
    f3 = d.figs / f"{_slug(p)}_monitors.png"
    if _monitor_figure(f3, p, prun, d.monitors, d.colors):
        doc.add(_image(f"{p}: curvature and noise recorded in the runs (off the clock)", f3))
    if d.lrs.get(p):
        f2 = d.figs / f"{_slug(p)}_lr.png"
        clipped = _lr_figure(f2, p, info, d.lrs[p], d.colors)
        doc.add(_image(f"{p}: learning-rate sensitivity", f2))
        if clipped:
            doc.add(_para(f"Clipped to the axis (outside the robust range): {'; '.join(clipped)}."))


def _environment_section(doc: _Doc, d: _Data) -> None:
    envs = [r["env"] for r in d.runs if r.get("env")]
    loads = [x for e in envs for x in run_loads(e)]
    env_rows = []
    if envs:
        for k in ("curvlab", "torch", "python", "platform", "threads", "cpu_count"):
            vals = sorted({str(e.get(k)) for e in envs})
            env_rows.append([k, ", ".join(vals)])
        if loads:
            env_rows.append(
                [
                    "1-min load average (run start/end)",
                    f"min {min(loads):.2f}, median {float(np.median(loads)):.2f}, max "
                    f"{max(loads):.2f}",
                ]
            )
    env_rows.append(
        ["report written with", f"python {platform.python_version()} on {platform.node() or '?'}"]
    )
    doc.add(_heading(2, "Environment"), _table(["item", "value"], env_rows))
    doc.md.append(
        "Wall-clock comparisons are only meaningful within one machine and load; steps and "
        "gradient-equivalents are the primary clocks."
    )


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 "
    "1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;"
    "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}figure{margin:1em "
    "0}figcaption{font-size:0.85em;color:#555}.note{color:#555;font-size:0.9em}"
)


def write_report(store_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.html``, ``report.md`` and ``figures/*.png`` for the store into ``out_dir``.

    Every label and name from the store is escaped (HTML in the page, HTML and Markdown syntax in
    the Markdown twin).

    Args:
        store_path: a curvlab store (opened read-only).
        out_dir: output directory (created).

    Returns:
        The path of ``report.html``.

    Raises:
        StoreError: no store there, or it was written by a newer schema.
    """
    out = Path(out_dir)
    figs = out / "figures"
    d = _Data(store_path, figs)
    figs.mkdir(parents=True, exist_ok=True)
    doc = _Doc()
    _intro_section(doc, d)
    _overall_section(doc, d)
    for p in sorted(d.problems):
        _problem_section(doc, d, p)
    _environment_section(doc, d)
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>curvlab benchmark "
        "report</title>"
        f"<style>{_STYLE}</style></head><body>" + "\n".join(doc.html) + "</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    (out / "report.md").write_text("\n\n".join(doc.md) + "\n", encoding="utf-8")
    return path
