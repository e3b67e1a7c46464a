"""Neural collapse in a bias-free deep linear unconstrained-feature model, balanced and imbalanced.

The model (Dang et al. 2023): free features H = [h_1 … h_N] (d × N), layers W_1 … W_{L-1} (d × d)
and W_L (K × d), no bias, N = Σ_k n_k examples with n_k in class k, the objective

    f = 1/(2N) ‖W_L ⋯ W_1 H − Y‖²_F + λ_W/2 Σ_l ‖W_l‖²_F + λ_H/2 ‖H‖²_F      (Y one-hot, K × N).

It is minimised by gradient descent (one step size for the weights, ``N`` times it for the
features, whose gradient carries a 1/N: a fixed block-diagonal preconditioner, same minimisers)
from a seeded Gaussian start until the Euclidean norm of the whole gradient (closed form, no
autograd) is below ``grad_tol``. For L >= 2, P = 0 below is a local minimum of every g_k, so GD can
stop at a critical point where a small class has collapsed; the length check then fails (at
λ = 2e-2 the quick size's start does this), and the run is graded not reproduced.

Predicted geometry (:func:`ufm_geometry`). At a global minimiser the features of a class collapse
to their mean h̄_k, the class means are orthogonal at every layer (an orthogonal frame, not a
simplex ETF: there is no bias), and the problem splits into one scalar problem per class: with
P_k = ‖W_L ⋯ W_1 h̄_k‖ (the output is P_k e_k), balancing the L + 1 factors gives
λ_W s_l² = n_k λ_H ‖h̄_k‖² = a_k for every layer's singular value s_l along class k, and P_k
minimises

    g_k(P) = n_k/(2N) (P − 1)² + (L + 1)/2 · β_k P^{2/(L+1)},   β_k = (λ_W^L n_k λ_H)^{1/(L+1)},

over P ≥ 0 (P = 0, the class's "minority collapse", when that is smaller), with a_k = β_k P^{2/(L+1)}.
The lengths follow: ‖h̄_k‖ = √(a_k/(n_k λ_H)) and ‖W_l ⋯ W_1 h̄_k‖ = ‖h̄_k‖ (a_k/λ_W)^{l/2}, so they
depend on the class size n_k; with balanced classes they are equal (equinorm).

Checks: NC1–NC4 of the features at every layer l = 0 … L−1 (the classifier of layer l is
W_L ⋯ W_{l+1}) with :func:`~curvlab.monitors.neural_collapse_metrics` (NC1, NC2 equinorm and
orthogonality, NC4); NC3 is the bias-free self-duality 1 − mean_k cos(row k of the classifier,
h̄_k); and the measured class-mean lengths at every layer (the last one: the outputs P_k) against
the closed form (relative error), balanced and imbalanced.

Tolerances come from the gradient norm ‖g‖ GD stopped at: with μ the smallest eigenvalue above
1e3·‖g‖ of the objective's dense Hessian at the end (the hidden-space rotations leave eigenvalues
≈ 0 that move none of the checked quantities), the iterate lies ≈ ‖g‖/μ from a minimiser, so with τ = ``safety``·(‖g‖/μ)/(the shortest
predicted class-mean length) the relative length errors, |cos| between class means and the
equinorm spread must be < τ, and NC1 and NC3 (quadratic in a perturbation) < τ²; NC4 must be 1.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import InvalidArgumentError
from curvlab.monitors.neural_collapse import neural_collapse_metrics
from curvlab.phenomena._common import PhenomenonResult, SeededConfig, failed_checks, finish

__all__ = ["ImbalancedCollapseConfig", "imbalanced_collapse", "ufm_geometry"]


@dataclass(frozen=True)
class ImbalancedCollapseConfig(SeededConfig):
    """Class sizes, model size, regularisation and the gradient-descent schedule.

    GD stops when the gradient norm falls below ``grad_tol`` (or after ``max_steps``); ``lr`` 0.1
    is stable from the Gaussian start at depth 3 (0.25 diverges or stalls there), and the slowest
    mode, weight decay of the unused directions, contracts by 1 − ``lr``·``lambda_w`` per step.
    """

    width: int = 8
    depth: int = 3
    lambda_w: float = 1e-2
    lambda_h: float = 1e-2
    """Weight decays λ_W of every W_l and λ_H of the features."""
    init_std: float = 0.5
    counts: tuple[int, ...] = (40, 20, 10, 5)
    """n_k, the examples of each class (the balanced run has ⌊N/K⌋ in each)."""
    lr: float = 0.1
    max_steps: int = 60000
    grad_tol: float = 1e-10
    safety: float = 100.0
    """Tolerances are ``safety`` times the first-order distance ‖g‖/μ to the minimiser."""

    def _check(self) -> None:
        if len(self.counts) < 2 or self.width < len(self.counts):
            raise InvalidArgumentError(
                f"ImbalancedCollapseConfig needs >= 2 classes and width >= the number of classes, "
                f"got counts {self.counts!r} and width {self.width}"
            )

    @classmethod
    def quick(cls) -> ImbalancedCollapseConfig:
        """The tests' size (seconds)."""
        return cls(counts=(12, 6, 3), width=4, grad_tol=1e-7)


def _scalar_minimiser(n_k: int, n: int, depth: int, beta: float) -> float:
    """argmin over P >= 0 of n_k/(2N)(P − 1)² + (L+1)/2 β P^{2/(L+1)} (at most 1)."""
    e = 2.0 / (depth + 1)

    def g(p: float) -> float:
        return n_k / (2 * n) * (p - 1) ** 2 + (depth + 1) / 2 * beta * p**e

    def dg(p: float) -> float:
        return n_k / n * (p - 1) + beta * p ** (e - 1)

    grid = np.linspace(1e-12, 1.0, 4001)
    best, best_val = 0.0, g(0.0)
    for lo, hi in itertools.pairwise(grid):
        if dg(lo) < 0 <= dg(hi):  # a local minimum in [lo, hi]: bisect the derivative
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if dg(mid) < 0 else (lo, mid)
            p = float((lo + hi) / 2)
            if g(p) < best_val:
                best, best_val = p, g(p)
    return best


def ufm_geometry(
    counts: Sequence[int], depth: int, lambda_w: float, lambda_h: float
) -> dict[str, Any]:
    """The predicted global-minimiser geometry of the bias-free deep linear UFM (module docstring).

    Args:
        counts: n_k, the examples per class.
        depth: L, the number of weight matrices.
        lambda_w: weight decay of every W_l.
        lambda_h: weight decay of the features.

    Returns:
        ``{"output": [P_k], "norms": [[‖W_l ⋯ W_1 h̄_k‖ for k] for l = 0 … L]}`` (l = 0: ‖h̄_k‖;
        l = L: P_k).

    Raises:
        InvalidArgumentError: an empty or non-positive ``counts``, ``depth`` < 1, or a
            non-positive weight decay.

    Example:
        >>> g = ufm_geometry([10, 10], depth=1, lambda_w=1e-2, lambda_h=1e-2)
        >>> [round(p, 4) for p in g["output"]]   # L = 1: P = 1 − N √(λ_W λ_H / n_k)
        [0.9368, 0.9368]
    """
    if not counts or min(counts) < 1 or depth < 1 or not (lambda_w > 0 and lambda_h > 0):
        raise InvalidArgumentError(
            f"ufm_geometry needs class counts >= 1, depth >= 1 and positive weight decays, got "
            f"counts {list(counts)!r}, depth {depth!r}, lambda_w {lambda_w!r}, lambda_h {lambda_h!r}"
        )
    n = sum(counts)
    outputs: list[float] = []
    norms: list[list[float]] = [[] for _ in range(depth + 1)]
    for n_k in counts:
        beta = (lambda_w**depth * n_k * lambda_h) ** (1 / (depth + 1))
        p = _scalar_minimiser(n_k, n, depth, beta)
        a = beta * p ** (2 / (depth + 1))
        outputs.append(p)
        h = math.sqrt(a / (n_k * lambda_h))
        for layer in range(depth + 1):
            norms[layer].append(h * (a / lambda_w) ** (layer / 2))
    return {"output": outputs, "norms": norms}


def _objective(ws: Sequence[Tensor], h: Tensor, y: Tensor, cfg: ImbalancedCollapseConfig) -> Tensor:
    out = h
    for w in ws:
        out = w @ out
    n = h.shape[1]
    reg = sum((w**2).sum() for w in ws) * (cfg.lambda_w / 2) + (h**2).sum() * (cfg.lambda_h / 2)
    return ((out - y) ** 2).sum() / (2 * n) + reg


def _gradients(
    ws: Sequence[Tensor], h: Tensor, y: Tensor, cfg: ImbalancedCollapseConfig
) -> list[Tensor]:
    """The gradient of :func:`_objective` in closed form: [∂W_1, …, ∂W_L, ∂H] (no autograd)."""
    feats = [h]
    for w in ws:
        feats.append(w @ feats[-1])
    back = (feats[-1] - y) / h.shape[1]
    grads: list[Tensor] = []
    for w, below in zip(reversed(ws), reversed(feats[:-1])):
        grads.append(back @ below.T + cfg.lambda_w * w)
        back = w.T @ back
    return [*reversed(grads), back + cfg.lambda_h * h]


def _smallest_curvature(
    ws: Sequence[Tensor], h: Tensor, y: Tensor, cfg: ImbalancedCollapseConfig, grad_norm: float
) -> float:
    """μ: the smallest Hessian eigenvalue above 1e3·``grad_norm`` (the symmetries' are ≈ 0)."""
    shapes = [p.shape for p in (*ws, h)]
    sizes = [p.numel() for p in (*ws, h)]

    def flat_objective(theta: Tensor) -> Tensor:
        parts = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes)]
        return _objective(parts[:-1], parts[-1], y, cfg)

    theta = torch.cat([p.flatten() for p in (*ws, h)])
    eig = torch.linalg.eigvalsh(torch.func.hessian(flat_objective)(theta))
    return float(eig[eig > 1e3 * grad_norm].min())


def _train(counts: Sequence[int], cfg: ImbalancedCollapseConfig) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(cfg.seed)
    k, d, n = len(counts), cfg.width, sum(counts)
    labels = torch.repeat_interleave(torch.arange(k), torch.tensor(list(counts)))
    y = torch.nn.functional.one_hot(labels, k).T.double()
    shapes = [(d, d)] * (cfg.depth - 1) + [(k, d)]
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) * cfg.init_std for s in shapes]
    h = torch.randn(d, n, generator=gen, dtype=torch.float64) * cfg.init_std
    grad_norm, step = math.inf, 0
    while step < cfg.max_steps:
        grads = _gradients(ws, h, y, cfg)
        grad_norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        if not grad_norm >= cfg.grad_tol:  # converged (or nan: diverged)
            break
        step += 1
        for p, g in zip(ws, grads[:-1]):
            p -= cfg.lr * g
        h -= cfg.lr * n * grads[-1]  # the features' gradient carries 1/N: a fixed preconditioner
    mu = _smallest_curvature(ws, h, y, cfg, grad_norm) if math.isfinite(grad_norm) else math.nan
    return {
        "ws": ws,
        "h": h,
        "labels": labels,
        "steps": step,
        "grad_norm": grad_norm,
        "curvature": mu,
        "distance": grad_norm / mu,
        "objective": float(_objective(ws, h, y, cfg)),
    }


def _layer_metrics(run: dict[str, Any], counts: Sequence[int]) -> list[dict[str, Any]]:
    ws, labels, k = run["ws"], run["labels"], len(counts)
    feats = run["h"]
    rows = []
    for layer in range(len(ws)):
        classifier = ws[-1]
        for w in reversed(ws[layer:-1]):
            classifier = classifier @ w
        m = neural_collapse_metrics(feats.T, labels, classifier)
        means = torch.stack([feats[:, labels == c].mean(1) for c in range(k)])  # K × d
        cos = torch.nn.functional.cosine_similarity(classifier, means, dim=1)
        rows.append(
            {
                "layer": layer,
                "nc1": m.nc1,
                "nc2_equinorm": m.nc2_equinorm,
                "nc2_orthogonal": m.nc2_orthogonal,
                "nc3_bias_free": float(1 - cos.mean()),
                "nc4": m.nc4,
                "class_mean_norms": means.norm(dim=1).tolist(),
            }
        )
        feats = ws[layer] @ feats
    out_means = torch.stack([feats[:, labels == c].mean(1) for c in range(k)])
    rows.append({"layer": len(ws), "class_mean_norms": out_means.norm(dim=1).tolist()})
    return rows


_ZERO_SHOWN_AT = 1e-40  # where the figure draws a metric that is exactly 0 (below every other)


def _rel_error(measured: list[list[float]], predicted: list[list[float]]) -> float:
    """max |measured − predicted| / predicted (absolute where a class collapses to 0)."""
    return max(
        abs(a - b) / (b or 1.0)
        for row_m, row_p in zip(measured, predicted)
        for a, b in zip(row_m, row_p)
    )


def imbalanced_collapse(
    config: ImbalancedCollapseConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Train the balanced and the imbalanced deep linear UFM; compare with :func:`ufm_geometry`.

    Paper: Dang, Tran, Osher, Tran-The, Ho & Nguyen, "Neural collapse in deep linear networks: from
    balanced to imbalanced data", ICML 2023 (arXiv 2301.00437).
    """
    del progress_bar  # two short runs
    cfg = config or ImbalancedCollapseConfig()
    total, k = sum(cfg.counts), len(cfg.counts)
    balanced = (total // k,) * k
    runs: dict[str, dict[str, Any]] = {}
    for name, counts in (("balanced", balanced), ("imbalanced", cfg.counts)):
        run = _train(counts, cfg)
        layers = _layer_metrics(run, counts)
        pred = ufm_geometry(counts, cfg.depth, cfg.lambda_w, cfg.lambda_h)
        measured = [row["class_mean_norms"] for row in layers]
        runs[name] = {
            "counts": list(counts),
            "steps": run["steps"],
            "grad_norm": run["grad_norm"],
            "objective": run["objective"],
            "layers": layers,
            "predicted_norms": pred["norms"],
            "predicted_output": pred["output"],
            "max_rel_error_norms": _rel_error(measured, pred["norms"]),
            "curvature": run["curvature"],
            "distance": run["distance"],
            "tolerance": cfg.safety
            * run["distance"]
            / min(filter(None, itertools.chain(*pred["norms"]))),
        }
    checks: dict[str, bool] = {}
    for name, r in runs.items():
        nc, tau = r["layers"][:-1], r["tolerance"]
        checks[f"{name}_converged_grad_<_{cfg.grad_tol:g}"] = r["grad_norm"] < cfg.grad_tol
        checks[f"{name}_nc1_<_tol^2_every_layer"] = all(row["nc1"] < tau**2 for row in nc)
        checks[f"{name}_class_means_orthogonal_<_tol"] = all(
            row["nc2_orthogonal"] < tau for row in nc
        )
        checks[f"{name}_nc3_bias_free_<_tol^2"] = all(row["nc3_bias_free"] < tau**2 for row in nc)
        checks[f"{name}_nc4_=_1"] = all(row["nc4"] == 1.0 for row in nc)
        checks[f"{name}_lengths_every_layer_match_closed_form_<_tol"] = (
            r["max_rel_error_norms"] < tau
        )
    checks["balanced_equinorm_<_tol"] = all(
        row["nc2_equinorm"] < runs["balanced"]["tolerance"]
        for row in runs["balanced"]["layers"][:-1]
    )
    imb = runs["imbalanced"]
    pred0 = imb["predicted_norms"][0]
    checks["imbalanced_norms_distinct_as_predicted"] = max(pred0) > 1.01 * min(pred0)
    numbers: dict[str, Any] = {"config": asdict(cfg), "checks": checks, **runs}
    err_b, err_i = runs["balanced"]["max_rel_error_norms"], imb["max_rel_error_norms"]
    worst = {
        key: max(row[key] for r in runs.values() for row in r["layers"][:-1])
        for key in ("nc1", "nc2_orthogonal", "nc3_bias_free")
    }
    note = (
        f"GD reached gradient norms {runs['balanced']['grad_norm']:.1e} (balanced, "
        f"{runs['balanced']['steps']} steps) and {imb['grad_norm']:.1e} (imbalanced {cfg.counts}, "
        f"{imb['steps']} steps); worst over layers and runs: NC1 {worst['nc1']:.1e}, class-mean "
        f"|cos| {worst['nc2_orthogonal']:.1e}, NC3 {worst['nc3_bias_free']:.1e}; class-mean "
        f"lengths at every layer match the closed form to {err_b:.1e} (balanced) and {err_i:.1e} "
        f"(imbalanced; outputs P_k = {', '.join(f'{p:.3f}' for p in imb['predicted_output'])}); "
        f"tolerances τ = {cfg.safety:g}·(‖g‖/μ)/(shortest predicted length) = "
        f"{runs['balanced']['tolerance']:.1e} and {imb['tolerance']:.1e} (μ = "
        f"{imb['curvature']:.2g}, the smallest non-symmetry Hessian eigenvalue)."
    )
    failed = failed_checks(checks)
    result = PhenomenonResult.from_checks(
        "imbalanced-collapse",
        numbers,
        note,
        (
            f"Depth-{cfg.depth} bias-free linear UFM (MSE, weight decay) trained by GD: "
            + (
                f"collapse at every layer to orthogonal class means whose lengths match the "
                f"closed form to {max(err_b, err_i):.0e} (balanced: equal; imbalanced: by n_k)."
                if not failed
                else f"failed: {', '.join(failed)} (the JSON has every number)."
            ),
            "Dang et al.: global minimisers collapse at every layer; without bias the class means "
            "form an orthogonal frame, equinorm if balanced, with lengths set by n_k if not.",
        ),
    )

    def draw(fig: Any) -> None:
        left, mid, right = fig.subplots(1, 3)
        for name, marker in (("balanced", "o"), ("imbalanced", "s")):
            layers = runs[name]["layers"][:-1]
            xs = [row["layer"] for row in layers]
            for key, color in (("nc1", "C0"), ("nc2_orthogonal", "C1"), ("nc3_bias_free", "C2")):
                vals = [row[key] or _ZERO_SHOWN_AT for row in layers]
                left.semilogy(xs, vals, marker + "-", color=color, label=f"{key} ({name})")
        left.set_xlabel("layer l (features W_l ⋯ W_1 H)")
        tau = imb["tolerance"]
        left.axhline(tau, color="k", ls="--", lw=0.8, label=f"τ (imbalanced) = {tau:.0e}")
        left.axhline(tau**2, color="k", ls=":", lw=0.8, label="τ² (bound for NC1, NC3)")
        left.set_xticks(xs)
        left.set_ylabel(f"NC metric (log; exactly 0 drawn at {_ZERO_SHOWN_AT:g})")
        left.set_title("Claim: collapse at every layer", fontsize=9)
        left.legend(fontsize=6)
        for c in range(k):
            measured = [row["class_mean_norms"][c] for row in imb["layers"]]
            predicted = [layer[c] for layer in imb["predicted_norms"]]
            mid.semilogy(
                range(len(measured)), measured, "o", color=f"C{c}", label=f"n={cfg.counts[c]}"
            )
            mid.semilogy(range(len(predicted)), predicted, "-", color=f"C{c}", lw=0.8)
        mid.set_xticks(range(cfg.depth + 1))
        mid.set_xlabel("layer l (L: the output)")
        mid.set_ylabel("class-mean length ‖h̄_k‖ (dots: GD, lines: closed form)")
        mid.set_title("Claim: imbalanced lengths follow n_k", fontsize=9)
        mid.legend(fontsize=7)
        right.plot(cfg.counts, imb["predicted_output"], "k-", lw=0.8, label="closed form P_k")
        right.plot(cfg.counts, imb["layers"][-1]["class_mean_norms"], "o", label="GD ‖W h̄_k‖")
        right.set_xlabel("class size n_k")
        right.set_ylabel("output P_k = ‖W_L ⋯ W_1 h̄_k‖")
        right.set_title("Claim: the output shrinks for small classes", fontsize=9)
        right.legend(fontsize=7)

    return finish(result, out_dir, draw, figsize=(13, 4.5))
