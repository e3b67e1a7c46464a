"""Tiny smoke runs of the memory and GPU benchmark scripts (their figures are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.timeout(300)
def test_curvature_memory_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "mem.json"
    _run("curvature_memory.py", "--sizes", "tiny", "--tasks", "eigsh,hutch++-9", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["task"] for r in rows] == ["eigsh", "hutch++-9"]
    assert all("error" not in r and r["n"] > 0 and r["matvecs"] > 0 for r in rows)


@pytest.mark.timeout(300)
def test_gpu_benchmark_runs_on_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "gpu.json"
    _run("gpu.py", "--device", "cpu", "--sizes", "tiny", "--reps", "1", "--out", str(out))
    report = json.loads(out.read_text())
    row = report["tiny"]
    assert row["no_sync_in_lanczos"].startswith("skipped")
    assert row["hvp_s"] > 0 and row["eigsh_matvecs"] > 0
    assert row["optim"]["adamw_fused_s"] > 0
    assert "adopt" in row["optim"]


@pytest.mark.timeout(300)
def test_harness_overhead_runs_two_repeats() -> None:
    # every repeat's harness run executes (a store runs each run once: the benchmark needs a new one)
    _run("harness_overhead.py", "--steps", "20", "--repeats", "2")
