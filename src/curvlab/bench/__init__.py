"""curvlab.bench: an honest optimizer benchmark with a crash-safe store and a report.

Public API::

    from curvlab.bench import load_suite, run_suite, write_report, Store, Problem, get_problem
    suite = load_suite("quick")                      # or a YAML file (validated)
    run_suite(suite, "out/store.sqlite")             # parallel workers, resumable, kill -9 safe
    write_report("out/store.sqlite", "out/")         # out/report.html, out/report.md, out/figures/

Scoring follows MLCommons AlgoPerf (Dahl et al. 2023, arXiv 2306.07179) and DeepOBS / Crowded
Valley (Schneider et al. 2019; Schmidt et al. 2021, arXiv 2007.01547); see
``curvlab.bench.scoring``.
"""

from __future__ import annotations

from curvlab.bench.problems import PROBLEMS, Problem, ProblemInstance, Target, get_problem
from curvlab.bench.report import write_report
from curvlab.bench.runner import SuiteResult, run_suite
from curvlab.bench.sink import StoreSink
from curvlab.bench.store import SCHEMA_VERSION, Store
from curvlab.bench.suites import SUITES, RunSpec, Suite, load_suite, parse_suite

__all__ = [
    "PROBLEMS",
    "SCHEMA_VERSION",
    "SUITES",
    "Problem",
    "ProblemInstance",
    "RunSpec",
    "Store",
    "StoreSink",
    "Suite",
    "SuiteResult",
    "Target",
    "get_problem",
    "load_suite",
    "parse_suite",
    "run_suite",
    "write_report",
]
