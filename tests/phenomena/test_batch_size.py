"""Batch size (Granziol et al.): the eigenvalue and bisection machinery, and the quick run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from curvlab.errors import InvalidArgumentError
from curvlab.operators import HessianOperator
from curvlab.phenomena._common import seeded_mlp
from curvlab.phenomena.batch_size import (
    BatchSizeConfig,
    batch_hessian_extremes,
    batch_size,
    bisect_log,
)
from curvlab.phenomena.eos import half_square_loss
from curvlab.phenomena.newton import loglog_slope


def test_extremes_match_the_dense_batch_hessian():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    t = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    net = seeded_mlp((4, 6, 3), nn.Tanh, 1).double()
    dense = HessianOperator(net, half_square_loss, (x, t), reduction="mean").to_dense()
    evals = torch.linalg.eigvalsh(dense)
    top, bottom = batch_hessian_extremes(net, x, t, seed=0)
    assert top == pytest.approx(float(evals[-1]), rel=1e-5)
    assert bottom == pytest.approx(float(evals[0]), rel=1e-5)


def test_bisection_brackets_a_known_threshold():
    calls = []

    def stable(v):
        calls.append(v)
        return v < 0.37

    best = bisect_log(stable, 1e-3, 1e3, 12)
    assert len(calls) == 12 and stable(best)
    assert 0.37 / 1e6 ** (2.0**-12) <= best < 0.37
    assert bisect_log(lambda v: False, 1e-3, 1e3, 5) == 1e-3  # nothing stable: the lower bound


def test_quick_run_numbers_are_consistent(tmp_path):
    cfg = BatchSizeConfig.quick()
    res = batch_size(cfg, out_dir=tmp_path)
    assert json.loads(res.json_path.read_text())["phenomenon"] == "batch-size"
    assert res.figure.exists()
    n = res.numbers
    full = n["hessian"]["full"]
    assert full["lambda_min"] < full["lambda_max"]
    for row, excess in zip(n["hessian"]["batches"], n["lambda_max_excess"]):
        assert len(row["lambda_max"]) == cfg.batches_per_size
        assert row["mean_lambda_max"] == pytest.approx(
            sum(row["lambda_max"]) / cfg.batches_per_size
        )
        assert excess == pytest.approx(row["mean_lambda_max"] - full["lambda_max"])
    for kind, rule in (("sgd", 1.0), ("adam", 0.5)):
        entry = n["lr"][kind]
        assert len(entry["max_stable_lr"]) == len(cfg.lr_batch_sizes)
        fit = [
            (b, v)
            for b, v in zip(cfg.lr_batch_sizes, entry["max_stable_lr"])
            if b <= cfg.fit_max_batch
        ]
        slope = loglog_slope([float(b) for b, _ in fit], [v for _, v in fit])
        assert math.isclose(entry["slope"], slope) and entry["predicted_slope"] == rule
    checks = n["checks"]
    assert checks["batch_lambda_max_above_full_at_every_B"] == all(
        e > 0 for e in n["lambda_max_excess"]
    )
    assert checks["sgd_max_lr_slope_within_0.25_of_1"] == (abs(n["lr"]["sgd"]["slope"] - 1) <= 0.25)
    assert res.reproduced in (True, "partly", False)


def test_bad_config():
    with pytest.raises(InvalidArgumentError, match="lr_batch_sizes"):
        BatchSizeConfig(lr_batch_sizes=(2, 64), fit_max_batch=16)
    with pytest.raises(InvalidArgumentError, match="bisections must be > 0"):
        BatchSizeConfig(bisections=0)
