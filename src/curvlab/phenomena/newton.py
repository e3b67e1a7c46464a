"""Newton's method: local quadratic convergence, the regularized method's global rate, and saddles.

Three runs of :class:`curvlab.optim.Newton` (matrix-free: Hessian-vector products and an inexact
Krylov solve), each scored against an exact float64 reference:

(a) Damped Newton (CG, no step-size rule: the pure Newton step) on the shipped breast_cancer
    logistic regression (569 × 30 standardised features and a bias, L2 λ on the weights) from
    zero. ``f*`` and ``w*`` come from an exact Newton loop on the dense Hessian. Near ``w*``
    Newton's error obeys ``e_{t+1} ≈ C e_t²``, so the log-log slope of ``e_{t+1}`` against ``e_t``
    is 2 until ``e`` reaches rounding.
(b) The gradient-regularized Newton method of Mishchenko (SIAM J. Optim. 2023, arXiv 2112.02089),
    ``λ_k = sqrt(H‖∇f(x_k)‖)``, from a far start ``x₀ = c·1``, with ``H`` the Hessian's Lipschitz
    bound ``max|σ'''|·mean‖x̃ᵢ‖³`` of the logistic loss. Its theorem: ``f(x_k) − f* = O(H R³/k²)``
    with ``R = ‖x₀ − x*‖``. Measured: ``k²(f(x_k) − f*)`` against ``H R³``, and the log-log slope of
    ``f(x_k) − f*`` against ``k`` from the peak of ``k²(f(x_k) − f*)`` to the end of the run
    (before the local superlinear phase).
(c) A two-layer 4 × 4 linear network ``W₂W₁`` on whitened inputs started at ``W ~ N(0, σ²)`` with
    small σ: the origin is a strict saddle (the Hessian has negative eigenvalues there). Plain
    Newton (MINRES on the indefinite Hessian) jumps towards the critical point it models and stays
    at the saddle; saddle-free Newton (``|H|`` in a Lanczos subspace, Dauphin et al. 2014) descends
    the negative-curvature directions and reaches the global minimum.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena._common import PhenomenonResult, SeededConfig, finish, loglog_slope

__all__ = ["NewtonConfig", "newton_phenomenon"]

DT = torch.float64


@dataclass(frozen=True)
class NewtonConfig(SeededConfig):
    """Sizes and settings of the three Newton runs."""

    lam: float = 1e-3
    local_steps: int = 12
    target: float = 1e-10
    far_start: float = 1.0
    regularized_steps: int = 200
    regularized_tol: float = 1e-8
    linear_dim: int = 4
    linear_singular_values: tuple[float, ...] = (2.0, 1.5, 1.0, 0.5)
    linear_samples: int = 32
    linear_init_std: float = 1e-3
    saddle_steps: int = 40
    krylov_dim: int = 32
    saddle_free_damping: float = 1e-3

    def _check(self) -> None:
        self._require_values("linear_singular_values", "linear_dim")
        if self.regularized_steps < 8:
            raise InvalidArgumentError(
                f"NewtonConfig.regularized_steps must be >= 8 to fit a rate, got "
                f"{self.regularized_steps}"
            )

    @classmethod
    def quick(cls) -> NewtonConfig:
        """The tests' size (seconds)."""
        return cls(regularized_steps=60, saddle_steps=30)


def _logistic(lam: float) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The breast_cancer objective f(w) (w = weights then bias) and the data with a ones column."""
    from curvlab.bench.problems.logistic import load_sklearn

    xn, yn = load_sklearn("breast_cancer")
    x = torch.tensor(xn, dtype=DT)
    y = torch.tensor(yn, dtype=DT)
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], dim=1)
    d = x.shape[1]

    def f(w: Tensor) -> Tensor:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w, y)
        return bce + 0.5 * lam * (w[:d] ** 2).sum()

    return f, xt


def _exact_minimum(f: Callable[[Tensor], Tensor], n: int) -> Tensor:
    """``argmin f`` by Newton with the dense float64 Hessian (torch.func) from zero."""
    w = torch.zeros(n, dtype=DT)
    for _ in range(100):
        g = torch.func.grad(f)(w)
        if float(g.norm()) < 1e-14:
            break
        w = w - torch.linalg.solve(torch.func.hessian(f)(w), g)
    return w


def _run(
    f: Callable[[Tensor], Tensor], w0: Tensor, steps: int, **kwargs: Any
) -> tuple[list[Tensor], list[float]]:
    """Iterates and losses of :class:`~curvlab.optim.Newton` on ``f`` (``steps + 1`` of each)."""
    from curvlab.optim.newton import Newton

    w = w0.clone().requires_grad_(True)
    opt = Newton([w], **kwargs)
    iterates, losses = [w0.clone()], [float(f(w0))]
    for _ in range(steps):
        opt.step(lambda: f(w))
        iterates.append(w.detach().clone())
        losses.append(float(f(iterates[-1])))
    return iterates, losses


def _local(cfg: NewtonConfig) -> tuple[dict[str, Any], Callable[[Tensor], Tensor], Tensor, Tensor]:
    """Run (a); returns its numbers, the objective, the data and ``w*``."""
    f, xt = _logistic(cfg.lam)
    w_star = _exact_minimum(f, xt.shape[1])
    f_star = float(f(w_star))
    iterates, losses = _run(f, torch.zeros_like(w_star), cfg.local_steps, tol=1e-12)
    gaps = [v - f_star for v in losses]
    errs = [float((w - w_star).norm()) for w in iterates]
    hit = [t for t, g in enumerate(gaps) if g < cfg.target]
    # pairs (e_t, e_{t+1}) in the local phase (e_t < 1) above rounding (e_{t+1} > 1e-12); last 3
    pairs = [(a, b) for a, b in itertools.pairwise(errs) if a < 1.0 and b > 1e-12][-3:]
    local = [
        math.log(b2 / b1) / math.log(a2 / a1) for (a1, b1), (a2, b2) in itertools.pairwise(pairs)
    ]
    numbers = {
        "f_star": f_star,
        "suboptimality": gaps,
        "error": errs,
        "iterations_to_target": hit[0] if hit else None,
        "fitted_pairs": pairs,
        "slope": loglog_slope([a for a, _ in pairs], [b for _, b in pairs]),
        "consecutive_slopes": local,
    }
    return numbers, f, xt, w_star


def _global(
    cfg: NewtonConfig, f: Callable[[Tensor], Tensor], xt: Tensor, w_star: Tensor
) -> dict[str, Any]:
    """Run (b) from the far start ``far_start · 1``."""
    f_star = float(f(w_star))
    # |σ'''| <= 1/(6√3) for the logistic loss, so H = max|σ'''| mean‖x̃ᵢ‖³ bounds ∇²f's Lipschitz
    lip = float((xt.norm(dim=1) ** 3).mean()) / (6 * math.sqrt(3))
    w0 = torch.full_like(w_star, cfg.far_start)
    radius = float((w0 - w_star).norm())
    _, losses = _run(
        f,
        w0,
        cfg.regularized_steps,
        method="regularized",
        hessian_lipschitz=lip,
        tol=cfg.regularized_tol,
    )
    gaps = [max(v - f_star, 0.0) for v in losses]
    scaled = [k * k * g for k, g in enumerate(gaps)]
    peak = max(range(1, len(gaps)), key=lambda k: scaled[k])
    window = [k for k in range(peak, len(gaps)) if gaps[k] > 1e-12]
    return {
        "hessian_lipschitz": lip,
        "radius": radius,
        "bound_H_R3": lip * radius**3,
        "suboptimality": gaps,
        "max_k2_gap": scaled[peak],
        "peak_k": peak,
        "fit_window": [window[0], window[-1]] if window else None,
        "slope": loglog_slope([float(k) for k in window], [gaps[k] for k in window]),
    }


def _saddle(cfg: NewtonConfig) -> dict[str, Any]:
    """Run (c): plain and saddle-free Newton from the same small random start."""
    gen = torch.Generator().manual_seed(cfg.seed)
    d, r = cfg.linear_dim, len(cfg.linear_singular_values)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    target = u[:, :r] @ torch.diag(torch.tensor(cfg.linear_singular_values, dtype=DT)) @ v[:, :r].T
    q, _ = torch.linalg.qr(torch.randn(cfg.linear_samples, d, generator=gen, dtype=DT))
    x = math.sqrt(cfg.linear_samples) * q.T  # whitened: X Xᵀ / N = I
    y = target @ x

    def f(w: Tensor) -> Tensor:
        w1, w2 = w[: d * d].view(d, d), w[d * d :].view(d, d)
        return 0.5 * ((y - w2 @ w1 @ x) ** 2).sum() / cfg.linear_samples

    w0 = cfg.linear_init_std * torch.randn(2 * d * d, generator=gen, dtype=DT)
    h0 = torch.linalg.eigvalsh(torch.func.hessian(f)(torch.zeros(2 * d * d, dtype=DT)))
    plain_w, plain = _run(f, w0, cfg.saddle_steps, solver="minres", tol=1e-12)
    _, free = _run(
        f,
        w0,
        cfg.saddle_steps,
        method="saddle-free",
        damping=cfg.saddle_free_damping,
        krylov_dim=cfg.krylov_dim,
    )
    return {
        "loss_at_saddle": float(f(torch.zeros_like(w0))),
        "hessian_at_saddle_min_eig": float(h0[0]),
        "plain_loss": plain,
        "plain_final_weight_norm": float(plain_w[-1].norm()),
        "saddle_free_loss": free,
        "saddle_free_steps_to_1e-10": next((t for t, v in enumerate(free) if v < 1e-10), None),
    }


def newton_phenomenon(
    config: NewtonConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Run the three Newton experiments (module docstring) and check each claim explicitly.

    Returns a :class:`~curvlab.phenomena.PhenomenonResult` whose ``numbers`` hold ``"local"``
    (suboptimality and error per iteration, iterations to ``target``, the fitted slope),
    ``"global"`` (the regularized method's suboptimality, ``max k²(f − f*)`` against ``H R³``, the
    fitted slope) and ``"saddle"`` (the losses of plain and saddle-free Newton).

    Example:
        >>> from curvlab.phenomena import newton_phenomenon, NewtonConfig
        >>> res = newton_phenomenon(NewtonConfig(regularized_steps=60, saddle_steps=30))
        >>> res.numbers["local"]["iterations_to_target"] <= 10
        True

    Papers: Mishchenko, SIAM J. Optim. 2023 (arXiv 2112.02089); Dauphin et al., NeurIPS 2014
    (arXiv 1406.2572); Hanzely et al., NeurIPS 2022 (arXiv 2211.00140).
    """
    cfg = config or NewtonConfig()
    local, f, xt, w_star = _local(cfg)
    glob = _global(cfg, f, xt, w_star)
    saddle = _saddle(cfg)
    slope_a, slope_b = local["slope"], glob["slope"]
    checks = {
        "damped_newton_reaches_target_within_local_steps": local["iterations_to_target"]
        is not None,
        "local_loglog_slope_within_0.3_of_2": abs(slope_a - 2.0) <= 0.3,
        "regularized_k2_gap_below_H_R3": glob["max_k2_gap"] <= glob["bound_H_R3"],
        "regularized_loglog_slope_at_most_-2_after_peak": slope_b <= -2.0,
        "origin_is_a_strict_saddle": saddle["hessian_at_saddle_min_eig"] < 0,
        "plain_newton_stays_at_the_saddle": saddle["plain_loss"][-1]
        >= 0.9 * saddle["loss_at_saddle"]
        and saddle["plain_final_weight_norm"] < 1e-2,
        "saddle_free_newton_reaches_1e-10": saddle["saddle_free_loss"][-1] < 1e-10,
    }
    numbers: dict[str, Any] = {
        "config": asdict(cfg),
        "checks": checks,
        "local": local,
        "global": glob,
        "saddle": saddle,
    }
    note = (
        f"(a) damped Newton: f − f* < {cfg.target:g} after {local['iterations_to_target']} "
        f"iterations, log-log slope of e_(t+1) on e_t {slope_a:.2f} (consecutive "
        f"{', '.join(f'{s:.2f}' for s in local['consecutive_slopes'])}); (b) regularized Newton "
        f"from ‖x₀ − x*‖ = {glob['radius']:.1f}: max k²(f − f*) = {glob['max_k2_gap']:.3g} at "
        f"k = {glob['peak_k']} against H R³ = {glob['bound_H_R3']:.3g}, slope after the peak "
        f"{slope_b:.2f}; (c) plain Newton ends at loss {saddle['plain_loss'][-1]:.3g} (saddle "
        f"{saddle['loss_at_saddle']:.3g}, ‖W‖ = {saddle['plain_final_weight_norm']:.1e}), "
        f"saddle-free Newton at {saddle['saddle_free_loss'][-1]:.1e} "
        f"(< 1e-10 after {saddle['saddle_free_steps_to_1e-10']} steps)."
    )
    result = PhenomenonResult.from_checks(
        "newton",
        numbers,
        note,
        (
            f"Left: damped Newton on breast_cancer logistic, f − f* < 1e-10 in "
            f"{local['iterations_to_target']} steps, error slope {slope_a:.2f}; middle: "
            f"regularized Newton from a far start, f − f* against k (slope {slope_b:.2f} after "
            f"the peak of k²(f − f*)); right: plain vs saddle-free Newton at a deep-linear saddle.",
            "Newton converges quadratically near a minimum (slope 2); Mishchenko's regularized "
            "Newton has f − f* = O(H R³/k²) globally; plain Newton is attracted to saddles, "
            "saddle-free Newton (|H|) escapes them.",
        ),
    )

    def draw(fig: Any) -> None:
        ax1, ax2, ax3 = fig.subplots(1, 3)
        ax1.semilogy([max(g, 1e-17) for g in local["suboptimality"]], "o-", label="f − f*")
        ax1.semilogy([max(e, 1e-17) for e in local["error"]], "s--", label="‖w − w*‖")
        ax1.axhline(cfg.target, color="gray", lw=0.8)
        ax1.set_xlabel("iteration")
        ax1.set_title("(a) damped Newton, logistic")
        ax1.legend()
        ks = list(range(1, len(glob["suboptimality"])))
        ax2.loglog(ks, [max(glob["suboptimality"][k], 1e-17) for k in ks], label="f(x_k) − f*")
        ax2.loglog(ks, [glob["bound_H_R3"] / k**2 for k in ks], "--", label="H R³ / k²")
        ax2.set_xlabel("k")
        ax2.set_title("(b) regularized Newton, far start")
        ax2.legend()
        ax3.semilogy(saddle["plain_loss"], label="plain Newton (MINRES)")
        ax3.semilogy([max(v, 1e-33) for v in saddle["saddle_free_loss"]], label="saddle-free")
        ax3.set_xlabel("iteration")
        ax3.set_title("(c) deep linear 4×4, small init")
        ax3.legend()

    return finish(result, out_dir, draw, figsize=(14.0, 4.5))
