"""Deep linear networks learn mode by mode along Saxe et al.'s sigmoidal closed form.

A two-layer linear network ŷ = W₂W₁x trained by full-batch GD (step η) on whitened inputs
(Σ_xx = I) with targets y = T x, T = U diag(s) Vᵀ. Started in the decoupled configuration
W₁ = R diag(a₀) Vᵀ, W₂ = U diag(a₀) Rᵀ (R orthogonal), every mode keeps its own strength
u_i = u_iᵀ W₂W₁ v_i, and gradient flow (time t·η) obeys du/dt = 2u(s − u), solved by

    u(t) = s·e^{2sηt} / (e^{2sηt} − 1 + s/u₀),        half-learning step t½ = ln(s/u₀ − 1) / (2sη)

(Saxe, McClelland & Ganguli 2014, eq. 7 with τ = 1/η). So each mode stays on a plateau, then rises
sigmoidally, and stronger modes are learned first, at a step ∝ 1/s. The run also starts from a small
*random* initialisation, where the modes couple: the same ordering and s·t½ ≈ constant still hold.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab.phenomena._common import PhenomenonResult, SeededConfig, finish

__all__ = ["DeepLinearConfig", "deep_linear", "saxe_mode_strength"]


@dataclass(frozen=True)
class DeepLinearConfig(SeededConfig):
    """Sizes and step settings of the deep-linear run."""

    dim: int = 8
    singular_values: tuple[float, ...] = (2.0, 1.5, 1.0, 0.5)
    num_samples: int = 64
    eta: float = 0.01
    steps: int = 2000
    init_scale: float = 1e-3
    random_init_std: float = 1e-3

    def _check(self) -> None:
        self._require_values("singular_values", "dim")


def saxe_mode_strength(t: Tensor, s: float, u0: float, eta: float) -> Tensor:
    """Saxe et al.'s closed form u(t) = s e^{2sηt} / (e^{2sηt} − 1 + s/u₀) at GD steps ``t``.

    Example:
        >>> import torch
        >>> u = saxe_mode_strength(torch.tensor([0.0, 1e4]), s=2.0, u0=1e-4, eta=0.01)
        >>> [round(float(v), 6) for v in u]
        [0.0001, 2.0]

    Paper: Saxe, McClelland & Ganguli, "Exact solutions to the nonlinear dynamics of learning in
    deep linear neural networks", ICLR 2014 (arXiv 1312.6120).
    """
    e = torch.exp(2 * s * eta * t.to(torch.float64))
    return s * e / (e - 1 + s / u0)


def _train(
    w1: Tensor, w2: Tensor, x: Tensor, y: Tensor, u: Tensor, v: Tensor, cfg: DeepLinearConfig
) -> Tensor:
    """Full-batch GD through autograd; returns the mode strengths [steps + 1, r]."""
    w1 = w1.clone().requires_grad_(True)
    w2 = w2.clone().requires_grad_(True)
    r = len(cfg.singular_values)
    out = torch.empty(cfg.steps + 1, r, dtype=torch.float64)
    n = x.shape[1]
    for t in range(cfg.steps + 1):
        with torch.no_grad():
            out[t] = torch.diagonal(u[:, :r].T @ (w2 @ w1) @ v[:, :r])
        if t == cfg.steps:
            break
        loss = 0.5 * ((y - w2 @ w1 @ x) ** 2).sum() / n
        g1, g2 = torch.autograd.grad(loss, (w1, w2))
        with torch.no_grad():
            w1 -= cfg.eta * g1
            w2 -= cfg.eta * g2
    return out


def _half_steps(curves: Tensor, s: Tensor) -> list[int | None]:
    halves: list[int | None] = []
    for i in range(curves.shape[1]):
        above = torch.nonzero(curves[:, i] >= s[i] / 2).flatten()
        halves.append(int(above[0]) if above.numel() else None)
    return halves


def deep_linear(
    config: DeepLinearConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Train a 2-layer linear network by GD and compare its mode curves with Saxe's closed form.

    Returns a :class:`~curvlab.phenomena.PhenomenonResult`; ``numbers`` holds the measured and
    closed-form curves of the decoupled run, their largest gap relative to s
    (``max_gap_over_s``), the half-learning steps of both runs and s·t½·η per mode.

    Example:
        >>> from curvlab.phenomena import deep_linear, DeepLinearConfig
        >>> res = deep_linear(DeepLinearConfig(singular_values=(2.0, 1.0), steps=800))
        >>> res.numbers["decoupled"]["max_gap_over_s"] < 0.05
        True

    Paper: Saxe, McClelland & Ganguli, ICLR 2014 (arXiv 1312.6120).
    """
    cfg = config or DeepLinearConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    dt = torch.float64
    d, r = cfg.dim, len(cfg.singular_values)
    s = torch.tensor(cfg.singular_values, dtype=dt)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dt))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dt))
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dt))
    target = u[:, :r] @ torch.diag(s) @ v[:, :r].T
    q, _ = torch.linalg.qr(torch.randn(cfg.num_samples, d, generator=gen, dtype=dt))
    x = math.sqrt(cfg.num_samples) * q.T  # d × N with X Xᵀ / N = I (whitened)
    y = target @ x

    a0 = torch.full((d,), cfg.init_scale, dtype=dt)
    w1 = rot @ torch.diag(a0) @ v.T
    w2 = u @ torch.diag(a0) @ rot.T
    decoupled = _train(w1, w2, x, y, u, v, cfg)
    steps = torch.arange(cfg.steps + 1, dtype=dt)
    u0 = cfg.init_scale**2
    closed = torch.stack([saxe_mode_strength(steps, float(si), u0, cfg.eta) for si in s], dim=1)
    gap = float(((decoupled - closed).abs() / s).max())

    w1r = cfg.random_init_std * torch.randn(d, d, generator=gen, dtype=dt)
    w2r = cfg.random_init_std * torch.randn(d, d, generator=gen, dtype=dt)
    random = _train(w1r, w2r, x, y, u, v, cfg)

    half_dec = _half_steps(decoupled, s)
    half_closed = [math.log(float(si) / u0 - 1) / (2 * float(si) * cfg.eta) for si in s]
    half_rand = _half_steps(random, s)
    st_rand = [float(si) * h * cfg.eta if h is not None else None for si, h in zip(s, half_rand)]
    reached = [h for h in half_rand if h is not None]
    ordered = len(reached) == r and all(a < b for a, b in itertools.pairwise(reached))
    finite_st = [x for x in st_rand if x is not None]
    spread = (max(finite_st) / min(finite_st)) if len(finite_st) == r else math.inf
    half_ok = all(h is not None and abs(h - c) <= 0.03 * c for h, c in zip(half_dec, half_closed))
    checks = {
        "decoupled_matches_closed_form_within_5pct_of_s": gap < 0.05,
        "decoupled_half_steps_within_3pct_of_closed_form": half_ok,
        "random_init_modes_learned_in_order_of_s": ordered,
        "random_init_s_times_half_step_constant_within_1.5x": spread < 1.5,
    }
    stride = max(1, cfg.steps // 300)
    numbers: dict[str, Any] = {
        "config": asdict(cfg),
        "checks": checks,
        "decoupled": {
            "max_gap_over_s": gap,
            "half_step_measured": half_dec,
            "half_step_closed_form": half_closed,
            "steps": steps[::stride].tolist(),
            "measured": decoupled[::stride].T.tolist(),
            "closed_form": closed[::stride].T.tolist(),
        },
        "random_init": {
            "half_step": half_rand,
            "s_times_half_step_times_eta": st_rand,
            "measured": random[::stride].T.tolist(),
        },
    }
    note = (
        f"decoupled start: largest gap to the closed form {gap:.3f}·s; half-learning steps "
        f"{half_dec} (closed form {[round(h) for h in half_closed]}); random start: half steps "
        f"{half_rand}, s·t½·η = {[round(x, 2) if x is not None else None for x in st_rand]}."
    )
    result = PhenomenonResult.from_checks(
        "deep-linear",
        numbers,
        note,
        (
            "Mode strengths uᵢᵀW₂W₁vᵢ of a two-layer linear network under GD (solid: decoupled start; "
            "dotted: small random start) against Saxe et al.'s closed form (dashed).",
            "Saxe et al.: each mode follows a sigmoid u(t) = s e^{2sηt}/(e^{2sηt} − 1 + s/u₀); modes "
            "are learned in order of singular value s, at a time ∝ 1/s.",
        ),
    )

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        xs = steps[::stride].numpy()
        for i in range(r):
            (line,) = ax.plot(xs, decoupled[::stride, i].numpy(), label=f"s={float(s[i]):g}")
            ax.plot(xs, closed[::stride, i].numpy(), "--", color=line.get_color(), alpha=0.8)
            ax.plot(xs, random[::stride, i].numpy(), ":", color=line.get_color())
        ax.set_xlabel("GD step")
        ax.set_ylabel("mode strength")
        ax.set_title(
            "Deep linear network: measured (solid), closed form (dashed), random init (dotted)"
        )
        ax.legend()

    return finish(result, out_dir, draw)
