"""Batch size: mini-batch Hessian extremes, and the largest stable learning rate against B.

A digits MLP 64 → 32 → 10 (tanh, float64, ½‖f(x) − onehot(y)‖² averaged over examples) is first
trained briefly by SGD. At that point the extreme eigenvalues λ_max and λ_min of the Hessian of
the loss on random mini-batches of B examples (drawn without replacement) are measured with
curvlab's Lanczos :func:`~curvlab.estimators.eigsh` on a :class:`~curvlab.operators.HessianOperator`
of the batch, against those of the full data's Hessian. Since λ_max is convex and λ_min concave on
symmetric matrices and the batch Hessian averages to the full one, Jensen's inequality gives
E λ_max(H_B) ≥ λ_max(H) ≥ λ_min(H) ≥ E λ_min(H_B), and the excess is non-increasing in B (a mean of
B + 1 exchangeable terms averages the B-term means); Granziol et al. model it by random-matrix
theory (an outlier shift ∝ 1/B).

Then, from a fixed start (float32, a seeded initialisation), SGD and Adam train the same MLP for
``lr_steps`` mini-batch steps of size B. A learning rate counts as *stable* when the full-data loss
after those steps is finite and below its initial value; the largest stable one is found by
bisection in log η between ``lr_range`` bounds (``bisections`` halvings, on the same batch
sequence for every η). Granziol et al. predict it ∝ B for SGD and ∝ √B for Adam while B is small;
the log-log slope is fitted over the batch sizes ≤ ``fit_max_batch`` and counted as matching a
rule when it lies within 0.25 of its exponent, i.e. nearer to it than to the other rule.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.datasets import digits
from curvlab.errors import InvalidArgumentError
from curvlab.estimators import eigsh
from curvlab.operators import HessianOperator
from curvlab.phenomena._common import (
    PhenomenonResult,
    SeededConfig,
    finish,
    loglog_slope,
    progress,
    seeded_mlp,
)
from curvlab.phenomena.eos import half_square_loss

__all__ = ["BatchSizeConfig", "batch_hessian_extremes", "batch_size", "bisect_log"]

SIZES = (64, 32, 10)
RULES = {"sgd": 1.0, "adam": 0.5}


@dataclass(frozen=True)
class BatchSizeConfig(SeededConfig):
    """Batch sizes, the number of batches per size, and the learning-rate search.

    The Hessian part runs in float64, the learning-rate part in float32.
    """

    num_samples: int = 1797
    """How many of the digits images both parts use."""
    hessian_batch_sizes: tuple[int, ...] = (8, 32, 128, 512)
    batches_per_size: int = 6
    train_steps: int = 200
    """SGD steps (lr 0.05, batch 64) to the point where the Hessians are measured."""
    lr_batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    fit_max_batch: int = 16
    """The log-log slope is fitted over the batch sizes up to this one."""
    lr_steps: int = 80
    bisections: int = 7
    sgd_lr_range: tuple[float, float] = (1e-3, 1e3)
    adam_lr_range: tuple[float, float] = (1e-5, 10.0)

    def _check(self) -> None:
        fitted = [b for b in self.lr_batch_sizes if b <= self.fit_max_batch]
        if (
            max(self.hessian_batch_sizes) >= min(self.num_samples, 1797)
            or len(fitted) < 2
            or self.sgd_lr_range[0] >= self.sgd_lr_range[1]
            or self.adam_lr_range[0] >= self.adam_lr_range[1]
        ):
            raise InvalidArgumentError(
                "BatchSizeConfig needs Hessian batch sizes in [1, num_samples - 1] (at most 1796), >= 2 learning-"
                "rate batch sizes <= fit_max_batch and increasing positive lr ranges; got "
                f"hessian_batch_sizes {self.hessian_batch_sizes!r}, lr_batch_sizes "
                f"{self.lr_batch_sizes!r}, fit_max_batch {self.fit_max_batch}, ranges "
                f"{self.sgd_lr_range!r}, {self.adam_lr_range!r}"
            )

    @classmethod
    def quick(cls) -> BatchSizeConfig:
        """The tests' size (seconds)."""
        return cls(
            num_samples=600,
            hessian_batch_sizes=(16, 256),
            batches_per_size=3,
            train_steps=50,
            lr_batch_sizes=(2, 8, 32),
            fit_max_batch=32,
            lr_steps=30,
            bisections=5,
        )


def _onehot(y: Tensor, dtype: torch.dtype) -> Tensor:
    return nn.functional.one_hot(y, 10).to(dtype)


def batch_hessian_extremes(
    model: nn.Module, x: Tensor, t: Tensor, seed: int
) -> tuple[float, float]:
    """(λ_max, λ_min) of the Hessian of ``half_square_loss`` on ``(x, t)`` by Lanczos (tol 1e-3)."""
    op = HessianOperator(model, half_square_loss, (x, t), reduction="mean")
    top, bottom = (
        float(eigsh(op, k=1, which=w, generator=torch.Generator().manual_seed(seed)).values[0])
        for w in ("LA", "SA")
    )
    return top, bottom


def bisect_log(stable: Callable[[float], bool], lo: float, hi: float, steps: int) -> float:
    """The largest stable value found by ``steps`` bisections of [lo, hi] in log scale.

    Assumes ``stable`` holds below a threshold and fails above it; returns the last stable
    midpoint (``lo`` if none was), within a factor (hi/lo)^(2^-steps) below the threshold.

    Example:
        >>> round(bisect_log(lambda v: v < 0.3, 1e-3, 1e3, 30), 6)
        0.3
    """
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo


def _stable(
    kind: str, lr: float, batch: int, data: tuple[Tensor, Tensor], cfg: BatchSizeConfig
) -> bool:
    x, t = data
    net = seeded_mlp(SIZES, nn.Tanh, cfg.seed)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(net.parameters(), lr=lr)
        if kind == "sgd"
        else torch.optim.Adam(net.parameters(), lr=lr)
    )
    gen = torch.Generator().manual_seed(cfg.seed + batch)
    with torch.no_grad():
        start = float(half_square_loss(net(x), t))
    for _ in range(cfg.lr_steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        opt.zero_grad()
        half_square_loss(net(x[idx]), t[idx]).backward()
        opt.step()
    with torch.no_grad():
        end = float(half_square_loss(net(x), t))
    return math.isfinite(end) and end < start


def _hessian_part(cfg: BatchSizeConfig, progress_bar: bool) -> dict[str, Any]:
    x, y = digits(cfg.num_samples, standardize=True, dtype=torch.float64)
    t = _onehot(y, x.dtype)
    model = seeded_mlp(SIZES, nn.Tanh, cfg.seed).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.train_steps):
        idx = torch.randint(len(x), (64,), generator=gen)
        opt.zero_grad()
        half_square_loss(model(x[idx]), t[idx]).backward()
        opt.step()
    full = batch_hessian_extremes(model, x, t, cfg.seed)
    out: dict[str, Any] = {"full": {"lambda_max": full[0], "lambda_min": full[1]}, "batches": []}
    sizes = cfg.hessian_batch_sizes
    for b in progress(sizes, len(sizes), "batch Hessians", progress_bar):
        picks = [torch.randperm(len(x), generator=gen)[:b] for _ in range(cfg.batches_per_size)]
        vals = [batch_hessian_extremes(model, x[p], t[p], cfg.seed) for p in picks]
        tops, bottoms = [v[0] for v in vals], [v[1] for v in vals]
        out["batches"].append(
            {
                "batch_size": b,
                "lambda_max": tops,
                "lambda_min": bottoms,
                "mean_lambda_max": sum(tops) / len(tops),
                "mean_lambda_min": sum(bottoms) / len(bottoms),
            }
        )
    return out


def _lr_part(cfg: BatchSizeConfig, progress_bar: bool) -> dict[str, Any]:
    x, y = digits(cfg.num_samples, standardize=True)
    data = (x, _onehot(y, x.dtype))
    out: dict[str, Any] = {}
    jobs = [(k, b) for k in RULES for b in cfg.lr_batch_sizes]
    ranges = {"sgd": cfg.sgd_lr_range, "adam": cfg.adam_lr_range}
    for kind, b in progress(jobs, len(jobs), "stable learning rates", progress_bar):
        lo, hi = ranges[kind]
        run = functools.partial(_stable, kind, batch=b, data=data, cfg=cfg)
        best = bisect_log(run, lo, hi, cfg.bisections)
        out.setdefault(kind, {"max_stable_lr": []})["max_stable_lr"].append(best)
    fitted = [i for i, b in enumerate(cfg.lr_batch_sizes) if b <= cfg.fit_max_batch]
    for kind, entry in out.items():
        lrs = entry["max_stable_lr"]
        entry["slope"] = loglog_slope(
            [float(cfg.lr_batch_sizes[i]) for i in fitted], [lrs[i] for i in fitted]
        )
        entry["predicted_slope"] = RULES[kind]
        entry["at_range_bound"] = sum(v in ranges[kind] for v in lrs)
    return out


def _draw(fig: Any, numbers: dict[str, Any], cfg: BatchSizeConfig) -> None:
    top, bottom, rates = fig.subplots(1, 3)
    hess = numbers["hessian"]
    sizes = [r["batch_size"] for r in hess["batches"]]
    for ax, key in ((top, "lambda_max"), (bottom, "lambda_min")):
        for r in hess["batches"]:
            ax.plot([r["batch_size"]] * len(r[key]), r[key], ".", color="0.6", ms=4)
        ax.plot(sizes, [r[f"mean_{key}"] for r in hess["batches"]], "o-", label="batch mean")
        ax.axhline(hess["full"][key], color="k", ls="--", lw=0.8, label="full data")
        ax.set_xscale("log")
        ax.set_xlabel("batch size B")
        ax.legend(fontsize=7)
    top.set_ylabel("λ_max of the batch Hessian")
    top.set_title("largest eigenvalue")
    bottom.set_ylabel("λ_min of the batch Hessian")
    bottom.set_title("smallest eigenvalue")
    bs = list(cfg.lr_batch_sizes)
    for kind, entry in numbers["lr"].items():
        lrs = entry["max_stable_lr"]
        rates.loglog(bs, lrs, "o-", label=f"{kind.upper()} (slope {entry['slope']:.2f})")
        ref = [lrs[0] * (b / bs[0]) ** entry["predicted_slope"] for b in bs]
        rates.loglog(bs, ref, ":", lw=0.8, label=f"∝ B^{entry['predicted_slope']:g}")
    rates.set_xlabel("batch size B")
    rates.set_ylabel(f"largest stable learning rate ({cfg.lr_steps} steps)")
    rates.set_title("largest stable learning rate")
    rates.legend(fontsize=7)


def batch_size(
    config: BatchSizeConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Measure mini-batch Hessian extremes and the largest stable SGD/Adam learning rate per B.

    ``numbers["hessian"]``: the full data's λ_max/λ_min and, per batch size, every batch's and
    their mean. ``numbers["lr"][optimizer]``: the largest stable learning rate per batch size, the
    fitted log-log slope and the predicted one. Checks (core): the mean batch λ_max above the full
    λ_max and the mean batch λ_min below the full λ_min at every B, the λ_max excess decreasing in
    B; (the rest of the claim) SGD's slope within 0.25 of 1 and Adam's within 0.25 of 0.5.

    Paper: Granziol, Zohren & Roberts, "Learning Rates as a Function of Batch Size: A Random
    Matrix Theory Approach to Neural Network Training", JMLR 2022 (arXiv 2006.09092; seed B3).
    """
    cfg = config or BatchSizeConfig()
    hess = _hessian_part(cfg, progress_bar)
    lr = _lr_part(cfg, progress_bar)
    full, rows = hess["full"], hess["batches"]
    excess = [r["mean_lambda_max"] - full["lambda_max"] for r in rows]
    checks = {
        "batch_lambda_max_above_full_at_every_B": all(e > 0 for e in excess),
        "batch_lambda_min_below_full_at_every_B": all(
            r["mean_lambda_min"] < full["lambda_min"] for r in rows
        ),
        "lambda_max_excess_decreases_with_B": all(b < a for a, b in itertools.pairwise(excess)),
        "sgd_max_lr_slope_within_0.25_of_1": abs(lr["sgd"]["slope"] - 1.0) <= 0.25,
        "adam_max_lr_slope_within_0.25_of_0.5": abs(lr["adam"]["slope"] - 0.5) <= 0.25,
    }
    numbers: dict[str, Any] = {
        "config": asdict(cfg),
        "checks": checks,
        "hessian": hess,
        "lambda_max_excess": excess,
        "lr": lr,
    }
    sizes = list(cfg.hessian_batch_sizes)
    fit = [b for b in cfg.lr_batch_sizes if b <= cfg.fit_max_batch]
    note = (
        f"full λ_max {full['lambda_max']:.3f}, λ_min {full['lambda_min']:.3f}; mean batch λ_max "
        f"at B = {sizes}: {[round(r['mean_lambda_max'], 3) for r in rows]}, λ_min "
        f"{[round(r['mean_lambda_min'], 3) for r in rows]}. Largest stable lr at B = "
        f"{list(cfg.lr_batch_sizes)}: SGD {[f'{v:.3g}' for v in lr['sgd']['max_stable_lr']]} "
        f"(slope {lr['sgd']['slope']:.2f} over B ≤ {fit[-1]}), Adam "
        f"{[f'{v:.3g}' for v in lr['adam']['max_stable_lr']]} (slope {lr['adam']['slope']:.2f})."
    )
    failed = [k for k in ("sgd", "adam") if abs(lr[k]["slope"] - RULES[k]) > 0.25]
    if failed:
        note += (
            f" The learning-rate rule does not reproduce for {' and '.join(failed).upper()} at "
            f"this scale (a {'-'.join(map(str, SIZES))} MLP on digits, {cfg.lr_steps} steps, "
            "stability judged by the loss after them), far from the paper's VGG/WideResNet "
            "networks trained to completion."
        )
    result = PhenomenonResult.from_checks(
        "batch-size",
        numbers,
        note,
        (
            f"Digits MLP: mini-batch Hessian λ_max/λ_min against B (mean of "
            f"{cfg.batches_per_size} batches; full data dashed) and the largest stable learning "
            f"rate against B, log-log slope {lr['sgd']['slope']:.2f} for SGD and "
            f"{lr['adam']['slope']:.2f} for Adam over B ≤ {fit[-1]}.",
            "Granziol et al.: batch Hessian extremes exceed the full Hessian's, approaching them "
            "as B grows; the largest stable learning rate scales ∝ B for SGD and ∝ √B for Adam.",
        ),
        full_claim=("sgd_max_lr_slope_within_0.25_of_1", "adam_max_lr_slope_within_0.25_of_0.5"),
    )
    return finish(result, out_dir, lambda fig: _draw(fig, numbers, cfg), figsize=(12.0, 4.2))
