"""Stability of SGD: at every minimum SGD (batch size 1) converges to, Tr(H)·η/2 ≤ 1.

Two over-parameterised regression models are trained to interpolation by SGD with one example
per step and, for comparison, by full-batch GD, at every step size η of a sweep, all from the same
start and on the same example sequence (float64):

* a two-layer ReLU network f(x) = Σₖ aₖ·relu(wₖᵀx) (no biases) on unit-norm inputs, labels from
  a 3-neuron teacher;
* a diagonal linear network f(x) = ⟨u⊙u − v⊙v, x⟩ from u = v = α·1 on a sparse regression
  problem (fewer examples than inputs, 3-sparse teacher), columns scaled to mean square 1.

The loss is L(θ) = (1/n) Σᵢ ½(f(xᵢ; θ) − yᵢ)², the *mean* over the n examples, and SGD steps
θ ← θ − η∇ℓᵢ(θ) with the same η. H is the Hessian of that mean (curvlab's dense
:class:`~curvlab.operators.HessianOperator`, its exact trace and eigenvalues). Wu & Su show that a
global minimum that is linearly stable for SGD with batch size 1 has Tr(H) ≤ 2/η, while GD's
stability only bounds λ_max(H) ≤ 2/η; since H ⪰ 0 at an interpolating minimum, λ_max ≤ Tr(H), so
the trace bound implies GD's and not conversely. A run counts as having reached a minimum when it
did not diverge and its final loss is below ``converged_ratio`` times the initial loss.

For both models every second derivative ∂²f/∂θⱼ² vanishes or cancels (aₖ, wₖ enter linearly per
ReLU region; ∂²/∂uⱼ² = 2xⱼ = −∂²/∂vⱼ²), so Tr(H) = (1/n) Σᵢ ‖∇_θ f(xᵢ)‖² exactly at every point,
and for the diagonal network with unit-mean-square columns Tr(H) = 4 Σⱼ (uⱼ² + vⱼ²) = 4‖θ‖²:
the trace bound is a bound on the parameter norm. The measured traces are checked against these
closed forms.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.errors import InvalidArgumentError
from curvlab.operators import HessianOperator
from curvlab.phenomena._common import PhenomenonResult, SeededConfig, finish, progress
from curvlab.phenomena.eos import half_square_loss

__all__ = [
    "DiagonalLinearNet",
    "SGDStabilityConfig",
    "TwoLayerReLU",
    "sgd_stability",
]

DT = torch.float64


@dataclass(frozen=True)
class SGDStabilityConfig(SeededConfig):
    """Sizes of the two problems, the two step-size sweeps and the training length.

    Both sweeps run SGD (one example per step) and GD for ``steps`` steps at every step size.
    """

    num_samples: int = 20
    """Training examples of each problem (fewer than parameters: the networks interpolate)."""
    relu_dim: int = 5
    relu_width: int = 40
    relu_etas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.3)
    """The ReLU network's step sizes (its inputs lie on the unit sphere)."""
    diag_dim: int = 40
    diag_init: float = 0.5
    """α of the diagonal network's start u = v = α·1."""
    diag_etas: tuple[float, ...] = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.08)
    steps: int = 5000
    converged_ratio: float = 1e-3
    """A run has reached a minimum when its final loss is below this times the initial loss."""

    def _check(self) -> None:
        if min(len(self.relu_etas), len(self.diag_etas)) < 3:
            raise InvalidArgumentError(
                f"SGDStabilityConfig needs >= 3 positive step sizes per model, got relu_etas "
                f"{self.relu_etas!r} and diag_etas {self.diag_etas!r}"
            )

    @classmethod
    def quick(cls) -> SGDStabilityConfig:
        """The tests' size (seconds)."""
        return cls(
            relu_width=20,
            relu_etas=(0.2, 0.3, 0.4, 1.3),
            diag_etas=(0.01, 0.02, 0.03, 0.08),
            steps=800,
        )


class _StackedNet(nn.Module):
    """A network of two parameter tensors whose forward also runs a stack of networks at once."""

    names: tuple[str, str]

    def __init__(self, first: Tensor, second: Tensor) -> None:
        super().__init__()
        for name, value in zip(self.names, (first, second)):
            self.register_parameter(name, nn.Parameter(value.clone()))

    @staticmethod
    def batched(params: Sequence[Tensor], x: Tensor) -> Tensor:
        """Outputs ``[runs, n]`` of a stack of networks (each parameter with a leading run axis)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """f(x) as a column ``[n, 1]``."""
        return self.batched([p[None] for p in self.parameters()], x)[0, :, None]


class TwoLayerReLU(_StackedNet):
    """f(x) = Σₖ aₖ·relu(wₖᵀx), float64; parameters ``w [m, d]`` and ``a [m]``."""

    names = ("w", "a")
    w: nn.Parameter
    a: nn.Parameter

    @staticmethod
    def batched(params: Sequence[Tensor], x: Tensor) -> Tensor:
        """Outputs ``[runs, n]`` of a stack of networks (``w [runs, m, d]``, ``a [runs, m]``)."""
        w, a = params
        return torch.einsum("rnm,rm->rn", torch.einsum("nd,rmd->rnm", x, w).relu(), a)

    def gauss_newton_trace(self, x: Tensor) -> float:
        """(1/n) Σᵢ ‖∇_θ f(xᵢ)‖² in closed form: Σₖ relu(wₖᵀxᵢ)² + Σₖ aₖ²·1[wₖᵀxᵢ > 0]·‖xᵢ‖²."""
        with torch.no_grad():
            z = x @ self.w.T
            per = z.relu().pow(2).sum(1) + (z > 0).to(x.dtype) @ self.a.pow(2) * x.pow(2).sum(1)
        return float(per.mean())

    def norm(self) -> float:
        """Path norm Σₖ |aₖ|·‖wₖ‖."""
        with torch.no_grad():
            return float((self.a.abs() * self.w.norm(dim=1)).sum())


class DiagonalLinearNet(_StackedNet):
    """f(x) = ⟨u⊙u − v⊙v, x⟩, float64; parameters ``u [d]`` and ``v [d]``."""

    u: nn.Parameter
    v: nn.Parameter
    names = ("u", "v")

    def gauss_newton_trace(self, x: Tensor) -> float:
        """(1/n) Σᵢ ‖∇_θ f(xᵢ)‖² in closed form: 4 Σⱼ (uⱼ² + vⱼ²)·(1/n) Σᵢ xᵢⱼ²."""
        with torch.no_grad():
            return float(4 * ((self.u**2 + self.v**2) * x.pow(2).mean(0)).sum())

    def norm(self) -> float:
        """Squared parameter norm ‖u‖² + ‖v‖² (= Tr(H)/4 with unit-mean-square columns)."""
        return float(self.u.detach().pow(2).sum() + self.v.detach().pow(2).sum())

    @staticmethod
    def batched(params: Sequence[Tensor], x: Tensor) -> Tensor:
        """Outputs ``[runs, n]`` of a stack of networks (``u``, ``v`` of shape ``[runs, d]``)."""
        u, v = params
        return (u * u - v * v) @ x.T


def _train(
    model: type[TwoLayerReLU | DiagonalLinearNet],
    start: Sequence[Tensor],
    data: tuple[Tensor, Tensor],
    etas: Sequence[float],
    sgd: bool,
    cfg: SGDStabilityConfig,
) -> tuple[list[Tensor], Tensor]:
    """SGD (one example per step) or GD from ``start`` at every η at once; (params, alive)."""
    x, y = data
    eta = torch.tensor(etas, dtype=DT)
    params = [p.expand(len(etas), *p.shape).clone().requires_grad_(True) for p in start]
    alive = torch.ones(len(etas), dtype=torch.bool)
    order = torch.randint(len(x), (cfg.steps,), generator=torch.Generator().manual_seed(cfg.seed))
    for t in range(cfg.steps):
        xb, yb = (x[order[t : t + 1]], y[order[t : t + 1]]) if sgd else (x, y)
        loss = 0.5 * (model.batched(params, xb) - yb).pow(2).mean(1)
        grads = torch.autograd.grad(loss.sum(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= eta.view(-1, *[1] * (p.dim() - 1)) * g
            if t % 50 == 0 or t == cfg.steps - 1:  # freeze diverged runs at zero
                alive &= torch.stack([p.flatten(1).abs().amax(1) < 1e4 for p in params]).all(0)
                for p in params:
                    p[~alive] = 0
    return [p.detach() for p in params], alive


def _measure(net: TwoLayerReLU | DiagonalLinearNet, x: Tensor, y: Tensor) -> dict[str, float]:
    """Loss, Tr(H) and extreme eigenvalues of curvlab's dense Hessian, the closed form, the norm."""
    hessian = HessianOperator(net, half_square_loss, (x, y[:, None]), reduction="mean").to_dense()
    evals = torch.linalg.eigvalsh(hessian)
    with torch.no_grad():
        loss = float(half_square_loss(net(x), y[:, None]))
    return {
        "loss": loss,
        "trace": float(hessian.trace()),
        "lambda_max": float(evals[-1]),
        "lambda_min": float(evals[0]),
        "trace_closed_form": net.gauss_newton_trace(x),
        "norm": net.norm(),
    }


def _problems(cfg: SGDStabilityConfig) -> dict[str, dict[str, Any]]:
    """The two data sets (train, test), model classes, starts and step sizes."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n, d, m = cfg.num_samples, cfg.relu_dim, cfg.relu_width

    def sphere(k: int) -> Tensor:
        z = torch.randn(k, d, generator=gen, dtype=DT)
        return z / z.norm(dim=1, keepdim=True)

    teacher = (torch.randn(3, d, generator=gen, dtype=DT), torch.tensor([1.0, -1.0, 1.0], dtype=DT))
    xr, xr_test = sphere(n), sphere(1000)
    relu_start = (
        0.5 * torch.randn(m, d, generator=gen, dtype=DT),
        0.1 * torch.randn(m, generator=gen, dtype=DT),
    )
    dd = cfg.diag_dim
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the diagonal problem: its own draws
    xd, xd_test = (torch.randn(k, dd, generator=gen, dtype=DT) for k in (n, 1000))
    scale = xd.pow(2).mean(0).sqrt()
    xd, xd_test = xd / scale, xd_test / scale
    beta = torch.zeros(dd, dtype=DT)
    beta[:3] = 1.0
    alpha = torch.full((dd,), cfg.diag_init, dtype=DT)
    return {
        "relu": {
            "model": TwoLayerReLU,
            "start": relu_start,
            "etas": cfg.relu_etas,
            "train": (xr, TwoLayerReLU.batched([p[None] for p in teacher], xr)[0]),
            "test": (xr_test, TwoLayerReLU.batched([p[None] for p in teacher], xr_test)[0]),
        },
        "diagonal": {
            "model": DiagonalLinearNet,
            "start": (alpha, alpha),
            "etas": cfg.diag_etas,
            "train": (xd, xd @ beta),
            "test": (xd_test, xd_test @ beta),
        },
    }


def _monotone_down(values: list[float], slack: float = 0.01) -> bool:
    """Each value at most ``(1 + slack)`` times the one before, and the last below the first."""
    steps_ok = all(b <= a * (1 + slack) for a, b in itertools.pairwise(values))
    return len(values) >= 2 and steps_ok and values[-1] < values[0]


def _summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per model: the sweep's numbers and what they show."""
    sgd = [r for r in runs["sgd"] if r["minimum"]]
    gd = [r for r in runs["gd"] if r["minimum"]]
    pairs = [(s, g) for s, g in zip(runs["sgd"], runs["gd"]) if s["minimum"] and g["minimum"]]
    return {
        "sgd_minima": len(sgd),
        "gd_minima": len(gd),
        "largest_sgd_stable_eta": max((r["eta"] for r in sgd), default=None),
        "largest_gd_stable_eta": max((r["eta"] for r in gd), default=None),
        "max_sgd_trace_eta_over_2": max((r["trace_eta_over_2"] for r in sgd), default=math.nan),
        "max_gd_trace_eta_over_2": max((r["trace_eta_over_2"] for r in gd), default=math.nan),
        "max_gd_lambda_eta_over_2": max((r["lambda_eta_over_2"] for r in gd), default=math.nan),
        "gd_minima_violating_trace_bound": sum(r["trace_eta_over_2"] > 1 for r in gd),
        "sgd_trace_below_gd_at_same_eta": sum(s["trace"] < g["trace"] for s, g in pairs),
        "same_eta_pairs": len(pairs),
        "sgd_trace_decreases_with_eta": _monotone_down([r["trace"] for r in sgd]),
        "sgd_norm_decreases_with_eta": _monotone_down([r["norm"] for r in sgd]),
        "max_rel_error_trace_vs_closed_form": max(
            abs(r["trace"] - r["trace_closed_form"]) / r["trace_closed_form"] for r in sgd + gd
        )
        if sgd or gd
        else math.nan,
    }


def sgd_stability(
    config: SGDStabilityConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Sweep η for SGD (batch 1) and GD on both models; measure Tr(H) and λ_max at each minimum.

    ``numbers[model]["runs"][optimizer]`` holds one record per η (loss, Tr(H) from curvlab's exact
    trace and from the dense Hessian, λ_max, λ_min, the closed form, the norm, the test error,
    whether it reached a minimum); ``numbers[model]["summary"]`` what they show. Checks: Tr(H)·η/2
    ≤ 1 at every SGD minimum of both models; Tr(H) (both) and ‖θ‖² (diagonal) non-increasing in η
    over SGD's minima (1% slack per step) and lower at the largest stable η than at the smallest;
    some GD minimum with λ_max·η/2 ≤ 1 but Tr(H)·η/2 > 1 (GD's bound is the weaker one); curvlab's
    trace equals the closed form to 1e-8.

    Paper: Wu & Su, "The Implicit Regularization of Dynamical Stability in Stochastic Gradient
    Descent", ICML 2023 (arXiv 2305.17490; seed B31).
    """
    cfg = config or SGDStabilityConfig()
    numbers: dict[str, Any] = {"config": asdict(cfg)}
    jobs = [(name, sgd) for name in ("relu", "diagonal") for sgd in (True, False)]
    problems = _problems(cfg)
    for name, sgd in progress(jobs, len(jobs), "SGD stability", progress_bar):
        prob = problems[name]
        (x, y), (xt, yt) = prob["train"], prob["test"]
        params, alive = _train(prob["model"], prob["start"], (x, y), prob["etas"], sgd, cfg)
        initial = float(
            0.5 * (prob["model"].batched([p[None] for p in prob["start"]], x) - y).pow(2).mean()
        )
        records = []
        for i, eta in enumerate(prob["etas"]):
            net = prob["model"](*(p[i] for p in params))
            rec: dict[str, Any] = {"eta": eta, "diverged": not bool(alive[i])}
            if alive[i]:
                rec |= _measure(net, x, y)
                with torch.no_grad():
                    rec["test_mse"] = float((net(xt)[:, 0] - yt).pow(2).mean())
                rec["trace_eta_over_2"] = rec["trace"] * eta / 2
                rec["lambda_eta_over_2"] = rec["lambda_max"] * eta / 2
            rec["minimum"] = bool(alive[i]) and rec["loss"] <= cfg.converged_ratio * initial
            records.append(rec)
        entry = numbers.setdefault(name, {"runs": {}, "initial_loss": initial})
        entry["runs"]["sgd" if sgd else "gd"] = records
    for name in ("relu", "diagonal"):
        numbers[name]["summary"] = _summarise(numbers[name]["runs"])
    rs, ds = numbers["relu"]["summary"], numbers["diagonal"]["summary"]
    both = (rs, ds)
    numbers["checks"] = {
        "sgd_reaches_minima_at_3_or_more_etas": all(s["sgd_minima"] >= 3 for s in both),
        "trace_bound_at_every_sgd_minimum": all(s["max_sgd_trace_eta_over_2"] <= 1 for s in both),
        "sgd_trace_decreases_with_eta": all(s["sgd_trace_decreases_with_eta"] for s in both),
        "diagonal_norm_decreases_with_eta": ds["sgd_norm_decreases_with_eta"],
        "gd_minima_obey_lambda_bound_but_break_trace_bound": all(
            s["max_gd_lambda_eta_over_2"] <= 1 and s["gd_minima_violating_trace_bound"] > 0
            for s in both
        ),
        "curvlab_trace_matches_closed_form_1e-8": all(
            s["max_rel_error_trace_vs_closed_form"] < 1e-8 for s in both
        ),
    }
    note = (
        "Tr(H)·η/2 at SGD's minima ≤ "
        + ", ".join(
            f"{s['max_sgd_trace_eta_over_2']:.2f} ({k}, {s['sgd_minima']} minima, largest stable η "
            f"{s['largest_sgd_stable_eta']}, GD's {s['largest_gd_stable_eta']})"
            for k, s in (("ReLU", rs), ("diagonal", ds))
        )
        + f"; GD's minima reach Tr(H)·η/2 = {rs['max_gd_trace_eta_over_2']:.2f} (ReLU) and "
        f"{ds['max_gd_trace_eta_over_2']:.2f} (diagonal) with λ_max·η/2 ≤ "
        f"{max(rs['max_gd_lambda_eta_over_2'], ds['max_gd_lambda_eta_over_2']):.2f}."
    )
    result = PhenomenonResult.from_checks(
        "sgd-stability",
        numbers,
        note,
        (
            f"Two-layer ReLU and diagonal linear networks trained to interpolation by SGD (batch "
            f"1) and GD per η: at SGD's minima Tr(H)·η/2 ≤ {max(rs['max_sgd_trace_eta_over_2'], ds['max_sgd_trace_eta_over_2']):.2f}"
            f" and Tr(H) falls as η grows; GD's minima keep λ_max·η/2 ≤ 1 with Tr(H)·η/2 up to "
            f"{max(rs['max_gd_trace_eta_over_2'], ds['max_gd_trace_eta_over_2']):.2f}.",
            "Wu & Su: a minimum linearly stable for SGD has Tr(H) ≤ 2/η, GD's only λ_max ≤ 2/η; "
            "for these models Tr(H) is a parameter norm, so larger η regularises more.",
        ),
    )
    return finish(result, out_dir, lambda fig: _draw(fig, numbers), figsize=(11.0, 8.0))


def _draw(fig: Any, numbers: dict[str, Any]) -> None:
    axes = fig.subplots(2, 2)
    styles = {
        ("relu", "sgd"): "o-",
        ("relu", "gd"): "o--",
        ("diagonal", "sgd"): "s-",
        ("diagonal", "gd"): "s--",
    }
    for (name, opt), style in styles.items():
        recs = [r for r in numbers[name]["runs"][opt] if r["minimum"]]
        eta = [r["eta"] for r in recs]
        label = f"{name}, {opt.upper()}"
        axes[0, 0].plot(eta, [r["trace_eta_over_2"] for r in recs], style, label=label)
        axes[0, 1].plot(eta, [r["trace"] for r in recs], style, label=label)
        axes[1, 1].plot(eta, [r["lambda_eta_over_2"] for r in recs], style, label=label)
        if opt == "sgd" or name == "diagonal":
            norm = "‖θ‖²" if name == "diagonal" else "path norm"
            axes[1, 0].plot(eta, [r["norm"] for r in recs], style, label=f"{label}: {norm}")
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xlabel("step size η")
        ax.legend(fontsize=7)
    for ax in (axes[0, 0], axes[1, 1]):
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
    axes[0, 0].set_ylabel("Tr(H)·η/2 at the minimum")
    axes[0, 0].set_title("SGD's minima obey Tr(H) ≤ 2/η")
    axes[0, 1].set_ylabel("Tr(H) at the minimum")
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_title("larger η: smaller Tr(H) (SGD)")
    axes[1, 0].set_ylabel("parameter norm at the minimum")
    axes[1, 0].set_yscale("log")
    axes[1, 0].set_title("larger η: smaller norm (SGD)")
    axes[1, 1].set_ylabel("λ_max(H)·η/2 at the minimum")
    axes[1, 1].set_title("GD's bound: λ_max ≤ 2/η (weaker)")
