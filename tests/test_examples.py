"""The examples run top to bottom and print what their docstrings promise."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_sophia_vs_adamw_trains_both(capsys):
    runpy.run_path(str(EXAMPLES / "sophia_vs_adamw.py"), run_name="__main__")
    out = capsys.readouterr().out
    accs = {
        m[0]: float(m[1])
        for m in re.findall(r"(\w+): final batch loss [\d.]+, test accuracy ([\d.]+)", out)
    }
    assert set(accs) == {"sophia", "adamw"}
    assert (
        min(accs.values()) > 0.9
    )  # both learn digits; the script compares, the test does not rank


@pytest.mark.slow
def test_watch_sharpness_reaches_the_edge(capsys):
    runpy.run_path(str(EXAMPLES / "watch_sharpness.py"), run_name="__main__")
    ratios = [float(r) for r in re.findall(r"λ_max·η/2 = ([\d.]+)", capsys.readouterr().out)]
    assert len(ratios) == 32
    late = sorted(ratios[len(ratios) // 2 :])
    assert 0.9 <= late[len(late) // 2] <= 1.2  # the median of the second half sits at 2/η


@pytest.mark.slow
def test_curvature_tour_runs(capsys):
    runpy.run_path(str(EXAMPLES / "curvature_tour.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "Hessian top-3" in out and "trace/n" in out and "scipy eigsh top-1" in out
