"""``curvlab bench``: run a benchmark suite into a store, report it, list what exists, export it.

Examples::

    curvlab bench run --suite quick --store out/store.sqlite     # rerun the same command to resume
    curvlab bench run --suite quick --store out/store.sqlite --executor ray --address HEAD:6379
    curvlab bench report --store out/store.sqlite --out out/      # prints the path of
    out/report.html
    curvlab bench demo --out out/                                 # both, for the quick suite
    curvlab bench calibrate --suite my.yaml --store out/cal.sqlite  # targets from tuned AdamW
    curvlab bench list
    curvlab bench export --store out/store.sqlite --format csv --out out/csv
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from curvlab.cli import check_out_dir, positive_float, positive_int
from curvlab.errors import CurvlabError

__all__ = ["register"]


def _run_suite(args: argparse.Namespace, store: str | Path) -> tuple[str, Any]:
    """Load the suite and run it into ``store`` (the shared part of ``run`` and ``demo``)."""
    from curvlab.bench.runner import run_suite
    from curvlab.bench.suites import load_suite

    suite = load_suite(args.suite, allow_import=args.allow_import)
    res = run_suite(suite, store, progress=not args.no_progress, **_executor_options(args))
    return suite.name, res


def _executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """``workers``, ``executor`` and ``address`` of :func:`~curvlab.bench.runner.run_suite`."""
    workers = 0 if args.in_process else args.workers
    return {"workers": workers, "executor": args.executor, "address": args.address}


def _cmd_run(args: argparse.Namespace) -> int:
    if args.report is not None:
        check_out_dir(args.report, "--report")
    name, res = _run_suite(args, args.store)
    print(
        f"suite {name}: {res.total} runs, {res.already_done} already in the store, "
        f"{res.finished} finished, {res.diverged} diverged, {res.failed} failed"
        f"{f', {res.taken} left to another runner' if res.taken else ''} "
        f"in {res.seconds:.1f} s -> {res.store}",
        file=sys.stderr,
    )
    if args.report:
        return _report(args.store, args.report)
    return 1 if res.failed else 0


def _report(store: str, out: str) -> int:
    from curvlab.bench.report import conclusion, write_report
    from curvlab.bench.store import Store

    Store(store, readonly=True).close()  # an unusable store is refused before --out is created
    print(write_report(store, check_out_dir(out)))
    print("\n".join(conclusion(store)))  # what the run supports, from the intervals
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    if args.out is None:  # the default, set here so that a full-disk error can name it
        args.out = str(Path(args.store).resolve().parent / "report")
    return _report(args.store, args.out)


def _cmd_demo(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)
    t0 = time.monotonic()
    _, res = _run_suite(args, out / "store.sqlite")
    rc = _report(str(out / "store.sqlite"), str(out))
    print(
        f"demo: {res.total} runs ({res.finished} finished, {res.diverged} diverged, {res.failed} "
        f"failed, {res.already_done} reused) in {time.monotonic() - t0:.1f} s",
        file=sys.stderr,
    )
    return rc


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from curvlab.bench.calibrate import calibrate, write_targets
    from curvlab.bench.suites import load_suite, targets_path

    suite = load_suite(args.suite, allow_import=args.allow_import, require_targets=False)
    cal = calibrate(
        suite,
        args.store,
        fraction=args.fraction,
        trials=args.trials,
        seeds=args.seeds,
        progress=not args.no_progress,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        **_executor_options(args),
    )
    print(write_targets(cal, targets_path(args.suite)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from curvlab.bench.optimizers import resolve_optimizer
    from curvlab.bench.problems import PROBLEMS, get_problem
    from curvlab.bench.suites import BUILTIN_OPTIMIZERS, SUITES

    doc: dict[str, Any] = {"problems": [], "optimizers": [], "suites": {}}
    for name in sorted(PROBLEMS):
        p = get_problem(name)
        try:
            p.check_data()
            avail = True
        except CurvlabError:
            avail = False
        info = {k: v for k, v in p.info().items() if k != "target_threshold"}  # the suite's
        doc["problems"].append({**info, "data_available": avail})
    for label, e in sorted(BUILTIN_OPTIMIZERS.items()):
        try:
            ok = resolve_optimizer(e.optimizer) is not None
        except CurvlabError:
            ok = False
        doc["optimizers"].append(
            {
                "label": label,
                "optimizer": e.optimizer,
                "available": ok,
                "defaults": {**e.fixed, **e.defaults},
                "search": {k: [v.low, v.high] for k, v in e.search.items()},
            }
        )
    doc["suites"] = {
        k: {"problems": v["problems"], "optimizers": v["optimizers"], "tracks": v["tracks"]}
        for k, v in SUITES.items()
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print("Problems:")
    for p in doc["problems"]:
        d = "≥" if p["higher_is_better"] else "≤"
        miss = "" if p["data_available"] else "   [data missing]"
        print(
            f"  {p['name']:22s} target {p['target_metric']} {d} (set per suite), "
            f"{p['budget_steps']} steps; {p['description']}{miss}"
        )
    print("Optimizers (suite entries):")
    for o in doc["optimizers"]:
        flag = "" if o["available"] else "   [not in the registry here]"
        print(f"  {o['label']:20s} -> {o['optimizer']}, defaults {o['defaults']}{flag}")
    print("Suites:")
    for k, v in doc["suites"].items():
        print(
            f"  {k}: {len(v['problems'])} problems ({', '.join(v['problems'])}); optimizers "
            f"{', '.join(o if isinstance(o, str) else o['label'] for o in v['optimizers'])}; "
            f"tracks {v['tracks']}"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from curvlab.bench.store import Store

    st = Store(args.store, readonly=True)
    try:
        paths = st.export(check_out_dir(args.out), args.format)
    finally:
        st.close()
    for p in paths:
        print(p)
    return 0


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options ``run``, ``demo`` and ``calibrate`` share: workers and executor, progress,
    permission to import code."""
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="parallel worker processes, >= 1 (default: number of cores)",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="run in this process, one run after another"
    )
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: a process pool on this machine (default); ray: Ray tasks on a Ray cluster "
        "(pip install curvlab[ray]), this process alone writing the store",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="with --executor ray: the cluster's head node, HOST:PORT (e.g. 10.0.0.1:6379) or "
        "'auto' (default: start a local Ray instance with --workers CPUs)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    parser.add_argument(
        "--allow-import",
        action="store_true",
        help="let suite entries name optimizers as 'module:Class' outside torch.optim and "
        "curvlab.optim (this imports and runs that code)",
    )


def _command(sub: Any, name: str, func: Any, help: str, description: str) -> Any:
    """Add the subcommand ``name`` running ``func``; returns its parser for the options."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(func=func)
    return parser


def register(subparsers: Any) -> None:
    """Add ``bench`` (``run``, ``report``, ``demo``, ``calibrate``, ``list``, ``export``) to the CLI."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmark optimizers on a suite of problems (AlgoPerf-style scoring, crash-safe "
        "store)",
        description=(
            "Run optimizers on a suite of problems under one training script and the same tuning "
            "budget, store every evaluation in SQLite (resumable, kill -9 safe), and report "
            "time-to-target, final quality, performance profiles and speed-ups over tuned AdamW."
        ),
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)

    run = _command(
        sub,
        "run",
        _cmd_run,
        "run a suite into a store (rerun to resume)",
        "Run every unfinished run of a suite; finished runs in the store are skipped. Several "
        "runners may share one store: each run is executed once.",
    )
    run.add_argument(
        "--suite", default="quick", help="quick, standard, or a YAML suite file (default: quick)"
    )
    run.add_argument("--store", required=True, help="SQLite store path (created; must be writable)")
    _add_run_options(run)
    run.add_argument("--report", metavar="DIR", default=None, help="also write the report into DIR")

    rep = _command(
        sub,
        "report",
        _cmd_report,
        "write report.html / report.md / figures from a store",
        "Write a self-contained HTML report (and Markdown) and print its path.",
    )
    rep.add_argument("--store", required=True, help="the store to report on")
    rep.add_argument("--out", default=None, help="output directory (default: <store dir>/report)")

    demo = _command(
        sub,
        "demo",
        _cmd_demo,
        "run the quick suite into DIR/store.sqlite and write DIR/report.html",
        "The main job end to end: quick suite, then the report; prints the report path.",
    )
    demo.add_argument(
        "--out", default="curvlab-out/bench", help="output directory (default: curvlab-out/bench)"
    )
    demo.add_argument("--suite", default="quick", help=argparse.SUPPRESS)
    _add_run_options(demo)

    cal = _command(
        sub,
        "calibrate",
        _cmd_calibrate,
        "set a suite's targets from the reference (tuned AdamW) and write them next to it",
        "Run tuned AdamW (warm-up + cosine; the suite's trials or more; several seeds of its own) "
        "on every problem of the suite and set each target to the best validation value that every "
        "calibration seed reaches within --fraction of the budget. Writes the targets with their "
        "provenance to <suite>.targets.yaml next to a YAML suite (or the shipped suite's targets "
        "file) and prints its path.",
    )
    cal.add_argument("--suite", required=True, help="quick, standard, or a YAML suite file")
    cal.add_argument("--store", required=True, help="SQLite store of the calibration runs")
    cal.add_argument(
        "--fraction",
        type=positive_float,
        default=0.5,
        help="share of the budget within which the reference reaches the target (default 0.5)",
    )
    cal.add_argument(
        "--trials",
        type=positive_int,
        default=None,
        help="reference configurations per seed (default: the suite's tuned trials)",
    )
    cal.add_argument("--seeds", type=positive_int, default=3, help="calibration seeds (default 3)")
    _add_run_options(cal)

    lst = _command(
        sub,
        "list",
        _cmd_list,
        "list problems, optimizers and suites",
        "List the registered problems (with data availability), optimizer entries and suites.",
    )
    lst.add_argument("--json", action="store_true", help="machine-readable output")

    exp = _command(
        sub,
        "export",
        _cmd_export,
        "export a store's runs and evaluations as CSV or JSON",
        "Write runs.csv + evals.csv, or store.json, for other tools.",
    )
    exp.add_argument("--store", required=True, help="the store to export")
    exp.add_argument(
        "--format", choices=("csv", "json"), default="csv", help="csv (default) or json"
    )
    exp.add_argument("--out", required=True, help="output directory")
