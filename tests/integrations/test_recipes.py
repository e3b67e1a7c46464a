"""The integration recipes of the docs (docs/recipes/*.py) run as written."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {
    "lightning_sophia.py": ("lightning",),
    "lightning_monitors.py": ("lightning",),
    "hf_trainer_sophia.py": ("transformers",),
    "hf_monitors.py": ("transformers", "tensorboard"),
    "accelerate_sophia.py": ("accelerate", "transformers"),
}


def test_every_recipe_is_tested():
    assert sorted(p.name for p in (ROOT / "docs" / "recipes").glob("*.py")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs(name):
    missing = [m for m in RECIPES[name] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"optional dependencies not installed: {missing}")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "recipes" / name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
