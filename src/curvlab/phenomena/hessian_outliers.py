"""Hessian outliers: the spectrum of a trained classifier is a bulk near zero plus ~C outliers.

Set-up: scikit-learn digits restricted to the first C classes (C in ``class_counts``,
``per_class`` examples each, standardised), an MLP 64-w-w-C with ReLU, trained by full-batch Adam
until the training loss falls below ``target_loss`` (MSE: ½‖f(x) − onehot(y)‖² averaged over
examples; CE: the mean cross-entropy). At that point the Hessian and the GGN of the training loss
(curvlab's :class:`~curvlab.HessianOperator` / :class:`~curvlab.GGNOperator`; for MSE the
operators use ``nn.MSELoss``, the same loss scaled by 2/C, which leaves counts and ratios alone)
are examined by two estimators: the top ``C + extra_ritz`` Ritz values (:func:`curvlab.eigsh`)
and the SLQ spectral density (:func:`curvlab.spectral_density`).

The outlier detector (:func:`count_outliers`) is, exactly: let e be the ``bulk_quantile``
quantile of the SLQ spectral measure (the probes' quadrature nodes and weights, averaged), so that
the bulk holds that fraction of the eigenvalues below e; among the Ritz values λ₁ ≥ λ₂ ≥ … above e
take the largest ratio gap λⱼ/λⱼ₊₁; if it is at least ``min_gap`` the outliers are λ₁…λⱼ, else
there are none. (Restricting the search to values above the SLQ bulk edge keeps the ratios of
near-zero bulk eigenvalues out of it.)

Prediction (Sagun et al. 2017: "#outliers ≈ #classes", more parameters only scale the bulk;
Papyan 2019/2020: the outliers come from the class/logit means of the logit gradients). The mean
part J̄ᵀĀJ̄ of the GGN (J̄ the mean logit Jacobian, Ā the mean Hessian of the loss in the logits)
has rank C for MSE (Ā = I) and C − 1 for cross-entropy (Ā = diag p − ppᵀ annihilates the all-ones
vector): so exactly C outliers are predicted with MSE and C − 1 with CE. The wide network
(``wide_width``) at the largest C tests that more parameters leave the count unchanged.

Grading: every (loss, C, operator) count must equal the prediction exactly for every seed; the
core (the wide network's count equal to the narrow one's at the largest C for every seed, and the
Hessian's top values within 10% of the GGN's) must hold too; when only counts miss, "partly".

Measured (default size, seeds 0 and 1): MSE C = 3 and 10 give exactly C (Hessian and GGN, both
seeds; 10 again at 4x the parameters), MSE C = 5 gives 0 (largest gap 1.44 < ``min_gap``) for seed
0 and 5 for seed 1; cross-entropy gives 1, 4, 0|1 for C = 3, 5, 10 against 2, 4, 9: "partly".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.datasets import digits
from curvlab.errors import InvalidArgumentError
from curvlab.estimators import SpectralDensity, eigsh, spectral_density
from curvlab.operators import GGNOperator, HessianOperator
from curvlab.phenomena._common import PhenomenonResult, SeededConfig, finish, seeded_mlp

__all__ = [
    "HessianOutliersConfig",
    "OutlierSplit",
    "count_outliers",
    "hessian_outliers",
    "slq_quantile",
]

_LOSSES = ("mse", "ce")


@dataclass(frozen=True)
class HessianOutliersConfig(SeededConfig):
    """Class counts, widths, training target and the detector's settings."""

    class_counts: tuple[int, ...] = (3, 5, 10)
    per_class: int = 180
    width: int = 16
    wide_width: int = 48
    """Hidden width of the wider network run at the largest C (more parameters, same task)."""
    target_loss: float = 0.05
    """Full-batch Adam (``lr``) stops when the training loss is below this, or at ``max_steps``."""
    losses: tuple[str, ...] = ("mse", "ce")
    max_steps: int = 3000
    lr: float = 3e-3
    seeds: int = 2
    """Every case is run from the initialisations ``seed``, ``seed`` + 1, …, ``seed + seeds − 1``."""
    extra_ritz: int = 6
    """Ritz values beyond C asked of :func:`curvlab.eigsh` (the gap needs the bulk's top too)."""
    _unchecked: ClassVar[tuple[str, ...]] = ("class_counts", "bulk_quantile", "min_gap")
    num_probes: int = 4
    lanczos_steps: int = 60
    bulk_quantile: float = 0.99
    min_gap: float = 1.5

    def _check(self) -> None:
        if not self.class_counts or not all(2 <= c <= 10 for c in self.class_counts):
            raise InvalidArgumentError(
                f"HessianOutliersConfig.class_counts must be digits class counts in [2, 10], got "
                f"{self.class_counts!r}"
            )
        if not self.losses or not set(self.losses) <= set(_LOSSES):
            raise InvalidArgumentError(
                f"HessianOutliersConfig.losses must be a non-empty subset of {_LOSSES}, got "
                f"{self.losses!r}"
            )
        _check_detector(self.bulk_quantile, self.min_gap)

    @classmethod
    def quick(cls) -> HessianOutliersConfig:
        """The tests' size (a few seconds)."""
        return cls(class_counts=(3,), wide_width=32, losses=("mse",), seeds=1)


def _check_detector(bulk_quantile: float, min_gap: float) -> None:
    if not 0.0 < bulk_quantile < 1.0:
        raise InvalidArgumentError(
            f"bulk_quantile must lie in (0, 1) (the SLQ mass below the bulk edge), got "
            f"{bulk_quantile!r}"
        )
    if not min_gap > 1.0:
        raise InvalidArgumentError(
            f"min_gap must be a ratio > 1 between the last outlier and the next value, got "
            f"{min_gap!r}"
        )


@dataclass(frozen=True)
class OutlierSplit:
    """The detector's answer: ``count`` outliers above ``threshold``; the SLQ bulk edge ``bulk_edge``.

    ``gap`` is the ratio λ_count/λ_(count+1) (the largest one above the bulk edge), ``threshold``
    their geometric mean (both ``nan`` when there is no candidate pair).
    """

    count: int
    bulk_edge: float
    gap: float
    threshold: float


def slq_quantile(density: SpectralDensity, q: float) -> float:
    """The ``q`` quantile of the SLQ spectral measure (nodes with their weights, probes averaged).

    Example:
        >>> import torch
        >>> from curvlab.estimators import spectral_density
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> esd = spectral_density(A, num_probes=2, lanczos_steps=100)   # exact quadrature: n steps
        >>> 89.0 <= slq_quantile(esd, 0.9) <= 91.0
        True
    """
    nodes = density.nodes.double().flatten().numpy()
    weights = density.weights.double().flatten().numpy() / density.nodes.shape[0]
    order = np.argsort(nodes, kind="stable")
    cum = np.cumsum(weights[order])
    i = min(int(np.searchsorted(cum, q * cum[-1])), len(order) - 1)
    return float(nodes[order][i])


def count_outliers(
    ritz: Sequence[float] | Tensor,
    density: SpectralDensity,
    *,
    bulk_quantile: float = 0.99,
    min_gap: float = 1.5,
) -> OutlierSplit:
    """Split the top of a spectrum into outliers and bulk (the module docstring's rule).

    Args:
        ritz: the top Ritz values (any order; sorted descending here), e.g. ``eigsh(op, k).values``.
        density: the SLQ density of the same operator.
        bulk_quantile: SLQ mass below the bulk edge e.
        min_gap: the smallest ratio λⱼ/λⱼ₊₁ that separates outliers from the bulk.

    Returns:
        :class:`OutlierSplit`.

    Raises:
        InvalidArgumentError: fewer than 2 Ritz values, ``bulk_quantile`` outside (0, 1) or
            ``min_gap`` <= 1.

    Example:
        >>> import torch
        >>> from curvlab.estimators import eigsh, spectral_density
        >>> A = torch.diag(torch.cat([torch.linspace(0.0, 1.0, 200), torch.tensor([5.0, 7.0])]))
        >>> g = torch.Generator().manual_seed(0)
        >>> esd = spectral_density(A.double(), num_probes=4, lanczos_steps=40, generator=g)
        >>> count_outliers(eigsh(A.double(), k=6).values, esd).count
        2
    """
    _check_detector(bulk_quantile, min_gap)
    values = sorted((float(v) for v in torch.as_tensor(ritz).flatten()), reverse=True)
    if len(values) < 2:
        raise InvalidArgumentError(
            f"count_outliers needs at least 2 Ritz values to find a gap, got {len(values)}; ask "
            "eigsh for k >= (expected outliers) + 2"
        )
    edge = slq_quantile(density, bulk_quantile)
    candidates = [j for j in range(len(values) - 1) if values[j] > edge and values[j + 1] > 0]
    if not candidates:
        return OutlierSplit(0, edge, math.nan, math.nan)
    best = max(candidates, key=lambda j: values[j] / values[j + 1])
    gap = values[best] / values[best + 1]
    threshold = math.sqrt(values[best] * values[best + 1])
    return OutlierSplit(best + 1 if gap >= min_gap else 0, edge, gap, threshold)


def _half_sq(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((out - nn.functional.one_hot(y, out.shape[1]).to(out.dtype)) ** 2).sum(1).mean()


def _subset(c: int, per_class: int) -> tuple[Tensor, Tensor]:
    x, y = digits(standardize=True, dtype=torch.float64)
    idx = torch.cat([torch.nonzero(y == k).flatten()[:per_class] for k in range(c)])
    return x[idx], y[idx]


def _train(
    x: Tensor, y: Tensor, c: int, width: int, loss: str, seed: int, cfg: HessianOutliersConfig
) -> tuple[nn.Module, float, int]:
    model = seeded_mlp((64, width, width, c), nn.ReLU, seed).double()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_loss = _half_sq if loss == "mse" else nn.functional.cross_entropy
    value, steps = math.inf, 0
    for steps in range(cfg.max_steps + 1):
        opt.zero_grad()
        objective = train_loss(model(x), y)
        value = float(objective.detach())
        if value < cfg.target_loss or steps == cfg.max_steps:
            break
        objective.backward()
        opt.step()
    return model, value, steps


def _spectrum(op: Any, c: int, seed: int, cfg: HessianOutliersConfig) -> dict[str, Any]:
    k = min(c + cfg.extra_ritz, op.shape[0])
    ritz = eigsh(op, k=k, tol=1e-3, generator=torch.Generator().manual_seed(seed)).values
    esd = spectral_density(
        op,
        num_probes=cfg.num_probes,
        lanczos_steps=cfg.lanczos_steps,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    split = count_outliers(ritz, esd, bulk_quantile=cfg.bulk_quantile, min_gap=cfg.min_gap)
    n = op.shape[0]
    above = float((esd.weights * (esd.nodes > split.threshold)).sum(1).mean()) * n
    return {
        "num_params": n,
        "ritz": ritz.tolist(),
        "outliers": split.count,
        "bulk_edge": split.bulk_edge,
        "gap": split.gap,
        "threshold": split.threshold,
        "slq_estimated_count_above_threshold": above,
        "min_slq_node": float(esd.nodes.min()),
        "grid": esd.grid[::10].tolist(),
        "density": esd.density[::10].tolist(),
    }


def _one_case(
    c: int, width: int, loss: str, seed: int, cfg: HessianOutliersConfig
) -> dict[str, Any]:
    x, y = _subset(c, cfg.per_class)
    model, value, steps = _train(x, y, c, width, loss, seed, cfg)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    op_loss = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    targets = nn.functional.one_hot(y, c).double() if loss == "mse" else y
    case: dict[str, Any] = {"classes": c, "width": width, "loss": loss, "seed": seed}
    case.update(train_loss=value, train_steps=steps, train_accuracy=acc)
    kinds = (("hessian", HessianOperator), ("ggn", GGNOperator))
    for name, cls in kinds if loss == "mse" else kinds[:1]:  # GGN vs Hessian: the MSE runs
        case[name] = _spectrum(cls(model, op_loss, (x, targets)), c, seed, cfg)
    return case


def _count_checks(
    cases: list[dict[str, Any]], cfg: HessianOutliersConfig
) -> tuple[dict[str, bool], str, list[str], list[str]]:
    """Exact count checks per (loss, C, operator) over every seed, the counts text, the Hessian
    counts off the prediction and which of those vary between seeds."""
    predicted = {"mse": 0, "ce": -1}  # C outliers for MSE, C - 1 for cross-entropy
    checks: dict[str, bool] = {}
    texts: list[str] = []
    differ: list[str] = []  # the Hessian counts off the prediction
    varies: list[str] = []  # those of them that differ between seeds
    for loss in cfg.losses:
        for c in cfg.class_counts:
            want = c + predicted[loss]
            group = [k for k in cases if k["loss"] == loss and k["classes"] == c]
            found = {
                kind: [k[kind]["outliers"] for k in group]
                for kind in ("hessian", "ggn")
                if kind in group[0]
            }
            texts.append(
                f"{loss.upper()} C={c}: " + "/".join(",".join(map(str, v)) for v in found.values())
            )
            for kind, values in found.items():
                checks[f"{loss}_C{c}_{kind}_outliers_=_{want}_every_seed"] = ok = all(
                    v == want for v in values
                )
                if not ok and kind == "hessian":
                    differ.append(f"{loss.upper()} C={c}: {','.join(map(str, values))} vs {want}")
                if not ok and kind == "hessian" and len(set(values)) > 1:
                    varies.append(f"{loss.upper()} C={c}")
    return checks, "; ".join(texts), differ, varies


def _top_rel_diff(case: dict[str, Any]) -> float:
    m = max(case["hessian"]["outliers"], 1)
    h, g = case["hessian"]["ritz"][:m], case["ggn"]["ritz"][:m]
    return max(abs(a - b) / abs(b) for a, b in zip(h, g))


def hessian_outliers(
    config: HessianOutliersConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Count Hessian/GGN outliers across class counts, losses and widths; write the figure/JSON.

    Paper: Sagun, Evci, Güney, Dauphin & Bottou, "Empirical analysis of the Hessian of
    over-parametrized neural networks", ICLR workshop 2018 (arXiv 1706.04454); Papyan,
    "Measurements of three-level hierarchical structure in the outliers in the spectrum of deepnet
    Hessians", ICML 2019 (arXiv 1901.08244).
    """
    del progress_bar  # a handful of short runs
    cfg = config or HessianOutliersConfig()
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    cases = [
        _one_case(c, cfg.width, loss, seed, cfg)
        for loss in cfg.losses
        for c in cfg.class_counts
        for seed in seeds
    ]
    c_max = max(cfg.class_counts)
    narrow = [k for k in cases if k["classes"] == c_max and k["loss"] == cfg.losses[0]]
    wide = [_one_case(c_max, cfg.wide_width, cfg.losses[0], seed, cfg) for seed in seeds]
    checks, counts, differ, varies = _count_checks(cases, cfg)
    seed_note = f"; {' and '.join(varies)} vary with the seed" if varies else ""
    full_claim = list(checks)
    checks[f"wider_net_same_outlier_count_C{c_max}_every_seed"] = all(
        w["hessian"]["outliers"] == k["hessian"]["outliers"] > 0 for w, k in zip(wide, narrow)
    )
    rel = {
        f"{k['loss']}_C{k['classes']}_w{k['width']}_seed{k['seed']}": _top_rel_diff(k)
        for k in [*cases, *wide]
        if "ggn" in k
    }
    checks["hessian_and_ggn_outliers_within_10pct"] = all(v < 0.1 for v in rel.values())
    numbers: dict[str, Any] = {
        "config": asdict(cfg),
        "checks": checks,
        "predicted_outliers": "C for MSE, C - 1 for cross-entropy",
        "cases": cases,
        "wide_cases": wide,
        "hessian_vs_ggn_top_rel_diff": rel,
    }
    wide_counts = ",".join(str(w["hessian"]["outliers"]) for w in wide)
    note = (
        f"outliers found (Hessian/GGN, seeds {seeds}): {counts}; {c_max} classes with "
        f"{wide[0]['hessian']['num_params']} instead of {narrow[0]['hessian']['num_params']} "
        f"parameters: {wide_counts} (bulk edge {narrow[0]['hessian']['bulk_edge']:.3g} → "
        f"{wide[0]['hessian']['bulk_edge']:.3g}); Hessian and GGN top values differ by at most "
        f"{max(rel.values()):.1%}."
        + (
            f" Hessian counts off the prediction (per seed): {'; '.join(differ)}{seed_note}: at "
            "this scale the gap that decides a count depends on the initialisation."
            if differ
            else ""
        )
    )
    shows = (
        f"Outliers (Hessian/GGN, seeds {seeds}): {counts}; at "
        f"{wide[0]['hessian']['num_params']} instead of {narrow[0]['hessian']['num_params']} "
        f"parameters {wide_counts}; "
        + (
            "every count as predicted."
            if not differ
            else f"off the prediction: {'; '.join(differ)}{seed_note} (seed-dependent at this scale)."
        )
    )
    result = PhenomenonResult.from_checks(
        "hessian-outliers",
        numbers,
        note,
        (
            shows,
            "Sagun et al./Papyan: bulk near zero plus one outlier per class (the logit-gradient "
            "means: rank C for MSE, C − 1 for cross-entropy); more parameters only grow the bulk.",
        ),
        full_claim=full_claim,
    )
    first = [k for k in cases if k["seed"] == cfg.seed]

    def draw(fig: Any) -> None:
        shown = [*first, wide[0]]
        axes = fig.subplots(1, 3)
        for case in shown:
            label = f"{case['loss'].upper()} C={case['classes']} w={case['width']}"
            ritz = case["hessian"]["ritz"]
            axes[0].semilogy(range(1, len(ritz) + 1), ritz, "o-", ms=3, label=label)
        axes[0].set_xlabel("Ritz index j (Hessian, descending)")
        axes[0].set_ylabel("eigenvalue λ_j")
        axes[0].set_title(f"Claim: ~C outliers then a gap (seed {cfg.seed})", fontsize=9)
        axes[0].legend(fontsize=6)
        for case in (narrow[0], wide[0]):
            h = case["hessian"]
            axes[1].semilogy(h["grid"], np.maximum(h["density"], 1e-12), label=f"w={case['width']}")
            axes[1].axvline(h["threshold"], ls=":", lw=0.8)
        axes[1].set_xlabel(f"eigenvalue (Hessian, C={c_max}, dotted: outlier threshold)")
        axes[1].set_ylabel("SLQ density (log; drawn at 1e-12 where lower)")
        axes[1].set_title("Claim: width grows only the bulk", fontsize=9)
        axes[1].legend(fontsize=7)
        for case in (k for k in shown if "ggn" in k):
            m = max(case["hessian"]["outliers"], 1)
            axes[2].plot(case["ggn"]["ritz"][:m], case["hessian"]["ritz"][:m], "o", ms=3)
        top = max((max(case["ggn"]["ritz"]) for case in shown if "ggn" in case), default=1.0)
        axes[2].plot([0, top], [0, top], "k--", lw=0.8)
        axes[2].set_xlabel("GGN outlier eigenvalue (MSE runs)")
        axes[2].set_ylabel("Hessian outlier eigenvalue")
        axes[2].set_title("Claim: outliers come from the GGN", fontsize=9)

    return finish(result, out_dir, draw, figsize=(13, 4.5))
