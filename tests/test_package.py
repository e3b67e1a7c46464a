"""The package's shape: what ``import curvlab`` loads, what it exports, what source may contain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import curvlab

ROOT = Path(__file__).resolve().parents[1]
APPLICATIONS = ("curvlab.bench", "curvlab.phenomena", "curvlab.monitors", "curvlab.cli")
HEAVY = ("sqlite3", "matplotlib", "sklearn", "yaml", "multiprocessing", "scipy")


def _modules_after(statement: str) -> dict[str, list[str]]:
    """The modules that ``statement`` adds to a fresh interpreter that has imported torch."""
    code = (
        "import json, sys, torch\n"
        "before = set(sys.modules)\n"
        f"{statement}\n"
        "print(json.dumps({'new': sorted(set(sys.modules) - before)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("statement", ["import curvlab", "import curvlab.optim"])
def test_import_curvlab_loads_only_the_library(statement: str) -> None:
    new = _modules_after(statement)["new"]
    assert not [m for m in new if m.startswith(APPLICATIONS)], new
    assert not [m for m in new if _top(m) in HEAVY], new
    # only the library's own packages load (73 modules before the lazy imports, 42 now)
    library = ("curvlab.errors", "curvlab.operators", "curvlab.estimators", "curvlab.optim")
    library += ("curvlab.schedules",)
    ours = [m for m in new if _top(m) == "curvlab" and m != "curvlab"]
    assert [m for m in ours if not m.startswith(library)] == []


def test_monitors_need_no_benchmark_store_or_plotting() -> None:
    new = _modules_after("import curvlab.monitors")["new"]
    assert not [m for m in new if m.startswith(("curvlab.bench", "curvlab.phenomena"))], new
    assert not [m for m in new if _top(m) in HEAVY], new


def test_applications_load_on_first_use() -> None:
    new = _modules_after("import curvlab; curvlab.bench.StoreSink; curvlab.zoo.ZOO")["new"]
    assert "curvlab.bench" in new and "curvlab.zoo" in new and "sqlite3" in new


def test_all_is_honest() -> None:
    assert len(curvlab.__all__) == len(set(curvlab.__all__))
    for name in curvlab.__all__:
        assert getattr(curvlab, name) is not None
    assert set(curvlab.__all__) <= set(dir(curvlab))
    for module in (curvlab.errors, curvlab.operators, curvlab.estimators):
        assert set(module.__all__) <= set(curvlab.__all__)
    assert curvlab.HessianOperator is curvlab.operators.HessianOperator
    assert curvlab.eigsh is curvlab.estimators.eigsh


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'benchmark'"):
        curvlab.benchmark


def test_source_has_no_control_characters() -> None:
    """``tools/check_source.py`` (run by ``make lint``) finds nothing in this slice's files."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_source.py"), "src/curvlab/__init__.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout


def test_check_source_reports_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_bytes(b"x = 1\n\ty = 2\nz = '\x08'\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_source.py"), str(bad)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert f"{bad}:2:" in out.stdout and "tab" in out.stdout
    assert f"{bad}:3:" in out.stdout and "0x08" in out.stdout
