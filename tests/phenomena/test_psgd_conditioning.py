"""The psgd-conditioning phenomenon: counts, exponents and grading at the quick size."""

from __future__ import annotations

import json
import math

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena import PHENOMENA, loglog_slope, write_index
from curvlab.phenomena.index import quick_config
from curvlab.phenomena.psgd_conditioning import PSGDConditioningConfig, psgd_conditioning


def test_quick_run_counts_exponents_and_grade(tmp_path):
    cfg = quick_config("psgd-conditioning")
    assert isinstance(cfg, PSGDConditioningConfig) and PHENOMENA["psgd-conditioning"][1] is type(
        cfg
    )
    res = psgd_conditioning(cfg, out_dir=tmp_path)
    num = res.numbers
    # the Adam count at the smallest κ, recounted by an independent loop with the chosen lr
    kappa, best = cfg.kappas[0], num["adam"][0]
    gen = torch.Generator().manual_seed(cfg.seed)
    rot, _ = torch.linalg.qr(torch.randn(cfg.dim, cfg.dim, generator=gen, dtype=torch.float64))
    A = rot @ torch.diag(torch.logspace(0, math.log10(kappa), cfg.dim, dtype=torch.float64)) @ rot.T
    xs = torch.randn(cfg.dim, generator=gen, dtype=torch.float64)
    x = torch.zeros(cfg.dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=best["lr"])
    f0, t = float(0.5 * xs @ A @ xs), 0
    while True:
        opt.zero_grad()
        loss = 0.5 * (x - xs) @ A @ (x - xs)
        if float(loss.detach()) <= cfg.tol * f0 or t > cfg.max_iters:
            break
        loss.backward()
        opt.step()
        t += 1
    assert best["iterations"] == t
    # exponents are the log-log slopes of the counts (censored counts enter as the cap)
    for m in ("psgd", "adam"):
        counts = [r["iterations"] for r in num[m]]
        ys = [float(cfg.max_iters if n is None else n) for n in counts]
        assert num["exponents"][m] == pytest.approx(loglog_slope(list(cfg.kappas), ys), abs=1e-12)
        assert num["exponent_is_lower_bound"][m] == (None in counts)
        assert all(r["lr"] in getattr(cfg, f"{m}_lrs") for r in num[m])
    # PSGD reaches the tolerance at every κ at this size (measured 19 and 148 iterations)
    assert all(r["iterations"] is not None for r in num["psgd"])
    # the grade follows the checks; the note names every failed check
    checks = num["checks"]
    if all(checks.values()):
        assert res.reproduced is True
    else:
        assert res.reproduced in ("partly", False)
        assert all(k in res.note for k, ok in checks.items() if not ok)
    doc = json.loads((tmp_path / "psgd_conditioning.json").read_text())
    assert (
        doc["reproduced"] == res.reproduced and doc["numbers"]["config"]["small_exponent"] == 0.15
    )
    assert (tmp_path / "psgd_conditioning.png").stat().st_size > 0
    page = write_index([res], tmp_path).read_text()
    assert 'id="psgd-conditioning"' in page and "nearly independent of κ" in page


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kappas": (1e2,)}, "needs at least two condition numbers"),
        ({"psgd_lrs": (0.1,), "adam_lrs": (0.1, 0.3)}, "grids of the same size"),
        ({"small_exponent": 1.0}, r"small_exponent must be in \[0, 1\)"),
        ({"tol": 0.0}, "PSGDConditioningConfig.tol must be > 0"),
    ],
)
def test_bad_config(kwargs, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        PSGDConditioningConfig(**kwargs)
