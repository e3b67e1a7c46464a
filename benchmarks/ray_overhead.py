"""Per-run overhead of the Ray executor over the local process pool, on (a subset of) the quick suite.

The same suite runs through ``run_suite(executor="local")`` and ``run_suite(executor="ray")`` into
fresh stores, alternating the order over repeats, with the same number of workers (one CPU each).
Ray is started once, before the first repeat (its start-up is reported apart: a cluster is started
once, not per suite). Per run, the store holds the claim time and the finish time; their difference
is the run's wall time as its executor sees it (local: claimed and finished in the worker; Ray:
claimed by the driver before the task is submitted, finished when the driver has recorded the
summary, so scheduling and the streaming of every record back to the driver are inside it).

Printed, medians over the runs of each repeat, then the median over repeats:

* ``wall/run``: median per-run wall seconds, local and Ray, and the ratio Ray / local;
* ``train/run``: the same for the runs' seconds clock (training steps only), a control for the
  machine's load (the executors run identical training code);
* ``wall - train``: median per-run wall seconds outside the training clock (evaluations, monitors,
  store writes, and for Ray the dispatch and the records' way back), local and Ray;
* ``suite``: the suite's wall seconds (``SuiteResult.seconds``; the local pool's includes starting
  its processes);
* the load average before and after, and the environment.

Usage: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/ray_overhead.py [--workers 2]
[--repeats 2] [--seeds 1] [--optimizers adamw,sgd-momentum] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from curvlab.bench.runner import environment, run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import Suite, load_suite


def subset(seeds: int, optimizers: list[str] | None) -> Suite:
    """The quick suite's defaults track with ``seeds`` seeds (and only ``optimizers``, if given)."""
    quick = load_suite("quick")
    entries = tuple(e for e in quick.optimizers if not optimizers or e.label in optimizers)
    return replace(quick, tracks=("defaults",), default_seeds=seeds, optimizers=entries)


def per_run(path: Path) -> tuple[list[float], list[float]]:
    """(wall seconds from claim to finish, seconds-clock) of every finished run in the store."""
    st = Store(path, readonly=True)
    try:
        rows = [r for r in st.runs() if r["status"] == "finished"]
        return [r["finished_at"] - r["started_at"] for r in rows], [r["seconds"] for r in rows]
    finally:
        st.close()


def one(suite: Suite, executor: str, workers: int, out: Path) -> dict[str, Any]:
    path = out / f"{executor}.sqlite"
    res = run_suite(suite, path, workers=workers, executor=executor, progress=False)
    assert res.failed == 0 and res.finished + res.diverged == res.total, res
    wall, train = per_run(path)
    return {
        "suite_s": res.seconds,
        "wall_med": statistics.median(wall),
        "train_med": statistics.median(train),
        "rest_med": statistics.median(w - t for w, t in zip(wall, train)),
        "runs": len(wall),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--optimizers", default=None, help="comma-separated labels (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import ray

    suite = subset(args.seeds, args.optimizers.split(",") if args.optimizers else None)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    reps: list[dict[str, dict[str, Any]]] = []
    try:
        for r in range(args.repeats):
            order = ("local", "ray") if r % 2 == 0 else ("ray", "local")
            with tempfile.TemporaryDirectory() as tmp:
                reps.append({ex: one(suite, ex, args.workers, Path(tmp)) for ex in order})
            print(f"repeat {r}: {json.dumps(reps[-1])}", flush=True)
    finally:
        ray.shutdown()
    load1 = os.getloadavg()

    def med(ex: str, key: str) -> float:
        return statistics.median(rep[ex][key] for rep in reps)

    doc = {
        "runs_per_suite": reps[0]["local"]["runs"],
        "workers": args.workers,
        "repeats": args.repeats,
        "ray_start_s": ray_start,
        "wall_per_run_s": {"local": med("local", "wall_med"), "ray": med("ray", "wall_med")},
        "wall_per_run_ratio": statistics.median(
            rep["ray"]["wall_med"] / rep["local"]["wall_med"] for rep in reps
        ),
        "train_per_run_ratio": statistics.median(
            rep["ray"]["train_med"] / rep["local"]["train_med"] for rep in reps
        ),
        "rest_per_run_s": {"local": med("local", "rest_med"), "ray": med("ray", "rest_med")},
        "suite_s": {"local": med("local", "suite_s"), "ray": med("ray", "suite_s")},
        "loadavg_before": load0,
        "loadavg_after": load1,
        "env": environment(),
        "repeats_detail": reps,
    }
    print(
        f"{doc['runs_per_suite']} runs x {args.repeats} repeats, {args.workers} workers; "
        f"Ray start {ray_start:.1f} s (once)\n"
        f"wall/run median: local {doc['wall_per_run_s']['local']:.3f} s, "
        f"ray {doc['wall_per_run_s']['ray']:.3f} s, ratio {doc['wall_per_run_ratio']:.3f}\n"
        f"train/run ratio (load control) {doc['train_per_run_ratio']:.3f}\n"
        f"wall - train per run median: local {doc['rest_per_run_s']['local']:.3f} s, "
        f"ray {doc['rest_per_run_s']['ray']:.3f} s\n"
        f"suite wall: local {doc['suite_s']['local']:.1f} s, ray {doc['suite_s']['ray']:.1f} s\n"
        f"load average before {load0}, after {load1}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
