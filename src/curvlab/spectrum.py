"""One call for the curvature summary of a model: top/bottom eigenvalues, trace, layers, density.

This is what ``curvlab spectrum`` prints and saves; it is a plain composition of the operators
and estimators, so a program can call it too.

Under ``torch.distributed`` (``torchrun``, or any launcher that initialises a process group of
two or more ranks) each rank passes its shard of the data; the operator becomes a
:class:`~curvlab.distributed.DistributedOperator` (one ``all_reduce`` per product), every
estimator runs in lockstep on every rank from the same seed, and the summary is the
single-process one on the union of the shards, to rounding, on every rank.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from curvlab.distributed._sync import (
    check_same_on_ranks,
    digest,
    launched_world_size,
    require_process_group,
)
from curvlab.distributed.operator import DistributedOperator
from curvlab.errors import InvalidArgumentError, UnknownNameError
from curvlab.estimators import eigsh, layer_sensitivity, spectral_density, trace
from curvlab.estimators.results import LayerSensitivity, SpectralDensity
from curvlab.operators import (
    CountingOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

__all__ = ["OPERATORS", "SpectrumSummary", "plot_density", "summarize_spectrum"]

OPERATORS = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "fisher": FisherOperator,
    "ef": EmpiricalFisherOperator,
}


@dataclass
class SpectrumSummary:
    """Every figure of a spectrum run (JSON-ready through :meth:`to_dict`)."""

    operator: str
    num_params: int
    world_size: int
    top_eigenvalues: list[float]
    top_residuals: list[float]
    bottom_eigenvalue: float
    bottom_residual: float
    trace: float
    trace_std_error: float
    layers: list[dict[str, Any]]
    density: dict[str, list[float]] = field(repr=False)
    matvecs: dict[str, int]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python data (what ``spectrum.json`` holds)."""
        return asdict(self)

    def table(self) -> str:
        """A summary a person can read in a terminal."""
        lines = [
            f"operator        {self.operator}  ({self.num_params:,} parameters"
            + (f", data over {self.world_size} ranks)" if self.world_size > 1 else ")"),
            "top eigenvalues " + "  ".join(f"{v:.6g}" for v in self.top_eigenvalues),
            "  residuals     " + "  ".join(f"{r:.1e}" for r in self.top_residuals),
            f"min eigenvalue  {self.bottom_eigenvalue:.6g}   (residual {self.bottom_residual:.1e})",
            f"trace           {self.trace:.6g} ± {self.trace_std_error:.2g}   "
            f"(mean eigenvalue {self.trace / self.num_params:.4g})",
            "",
            "per layer (trace from one probe set; λ_max of each diagonal block):",
        ]
        header = (
            f"  {'block':<20}{'params':>10}{'trace':>13}{'± s.e.':>11}{'trace/n':>12}{'λ_max':>12}"
        )
        lines += [header, "  " + "-" * (len(header) - 2)]
        for r in self.layers:
            lines.append(
                f"  {r['block']:<20}{r['num_params']:>10,}{r['trace']:>13.5g}"
                f"{r['trace_std_error']:>11.2g}{r['trace_per_param']:>12.4g}{r['top_eigenvalue']:>12.5g}"
            )
        cost = ", ".join(f"{k} {v}" for k, v in self.matvecs.items())
        secs = sum(self.seconds.values())
        lines += ["", f"products: {cost}  (total {sum(self.matvecs.values())}, {secs:.1f} s)"]
        return "\n".join(lines)


def summarize_spectrum(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    operator: str = "hessian",
    top_k: int = 5,
    tol: float = 1e-3,
    trace_matvecs: int = 99,
    layer_matvecs: int = 60,
    num_probes: int = 4,
    lanczos_steps: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
    group: Any = None,
) -> tuple[SpectrumSummary, SpectralDensity, LayerSensitivity]:
    """Compute the curvature summary of ``model`` on ``data`` (see ``curvlab spectrum --help``).

    With an initialised process group of two or more ranks, ``data`` is this rank's shard and the
    summary is that of the union of the shards (see the module); a DDP-wrapped ``model`` is
    unwrapped (``model.module``) for the curvature products.

    Args:
        group: the ``torch.distributed`` process group (default: the world, when initialised).

    Returns:
        ``(summary, density, layers)``: the JSON-ready summary and the raw estimator results.

    Raises:
        UnknownNameError: an unknown ``operator``.
        InvalidArgumentError: a count below 1 or a ``tol`` that is not a positive finite number.
        DistributedError: the launcher announced several ranks (``WORLD_SIZE``) but no process
            group is initialised, or the ranks disagree on the model, the settings or the seed.
    """
    if operator not in OPERATORS:
        raise UnknownNameError(f"operator must be one of {sorted(OPERATORS)}, got {operator!r}")
    for name, n in zip(
        ("top_k", "trace_matvecs", "layer_matvecs", "num_probes", "lanczos_steps"),
        (top_k, trace_matvecs, layer_matvecs, num_probes, lanczos_steps),
    ):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"{name} must be an integer >= 1, got {n!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InvalidArgumentError(
            f"tol must be a positive finite number such as 1e-3, got {tol!r}"
        )
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # no double backward through the wrapper
    world = _world_size(group)
    base: Any = OPERATORS[operator](model, loss_fn, data)
    if world > 1:
        settings = (operator, top_k, tol, trace_matvecs, layer_matvecs, num_probes, lanczos_steps)
        rng = generator if generator is not None else torch.default_generator
        check_same_on_ranks(
            {"the settings": digest([repr(settings)]), "the seed": digest([rng.get_state()])},
            group,
        )
        base = DistributedOperator(base, group)
    op = CountingOperator(base)
    seconds: dict[str, float] = {}
    matvecs: dict[str, int] = {}

    def stage(name: str, fn: Any) -> Any:
        op.reset()
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - t0
        matvecs[name] = op.num_matvecs
        return out

    gen = _stage_generators(generator)
    top = stage("top", lambda: eigsh(op, k=top_k, tol=tol, generator=gen["top"]))
    bottom = stage("bottom", lambda: eigsh(op, k=1, which="SA", tol=tol, generator=gen["bottom"]))
    tr = stage("trace", lambda: trace(op, trace_matvecs, generator=gen["trace"], progress=progress))
    layers = stage(
        "layers",
        lambda: layer_sensitivity(
            model,
            loss_fn,
            data,
            num_matvecs=layer_matvecs,
            operator=base,  # the per-layer table is of the chosen operator, not the Hessian
            generator=gen["layers"],
            progress=progress,
        ),
    )
    matvecs["layers"] = layers.num_matvecs  # products on its own (block) operators
    density = stage(
        "density",
        lambda: spectral_density(
            op, num_probes, lanczos_steps, generator=gen["density"], progress=progress
        ),
    )
    summary = SpectrumSummary(
        operator=operator,
        num_params=op.shape[0],
        world_size=world,
        top_eigenvalues=[float(v) for v in top.values],
        top_residuals=[float(r) for r in top.residuals],
        bottom_eigenvalue=float(bottom.values[0]),
        bottom_residual=float(bottom.residuals[0]),
        trace=float(tr.value),
        trace_std_error=float(tr.std_error),
        layers=layers.rows(),
        density={
            "grid": density.grid.tolist(),
            "density": density.density.tolist(),
            "nodes": density.nodes.flatten().tolist(),
            "weights": density.weights.flatten().tolist(),
            "sigma": [density.sigma],
        },
        matvecs=matvecs,
        seconds={k: round(v, 4) for k, v in seconds.items()},
    )
    return summary, density, layers


_STAGES = ("top", "bottom", "trace", "layers", "density")


def _stage_generators(generator: torch.Generator | None) -> dict[str, torch.Generator | None]:
    """One generator per stage, seeded from ``generator`` (``None``: torch's global one for all).

    A stage's draws then do not depend on how many the stages before it took (a Lanczos restart
    after a breakdown draws more, and whether one happens can turn on the last bit of a product,
    which differs between one process and several).
    """
    if generator is None:
        return dict.fromkeys(_STAGES)
    seeds = torch.randint(2**62, (len(_STAGES),), generator=generator, device=generator.device)
    return {
        name: torch.Generator(device=generator.device).manual_seed(int(seed))
        for name, seed in zip(_STAGES, seeds)
    }


def _world_size(group: Any) -> int:
    """The number of ranks the summary spans: the group's size, or 1 outside torch.distributed.

    Raises:
        DistributedError: ``WORLD_SIZE`` says several ranks were launched but no process group
            is initialised (each rank would summarise its own shard only).
    """
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size(group))
    if launched_world_size() > 1:
        require_process_group(
            f"summarize_spectrum with WORLD_SIZE={launched_world_size()} (each rank would "
            "otherwise summarise its own shard only)"
        )
    return 1


def plot_density(
    density: SpectralDensity, path: str | Path, title: str = "", top: list[float] | None = None
) -> Path:
    """Write the spectral density (log scale, as eigenvalue densities are usually read) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.semilogy(
        density.grid.numpy(), density.density.numpy().clip(min=1e-12), lw=1.4, color="#1f5fa8"
    )
    for lam in top or []:
        ax.axvline(lam, color="#c0392b", lw=0.8, alpha=0.6)
    ax.set_ylim(bottom=max(1e-8, float(density.density.max()) * 1e-8))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title or "spectral density (stochastic Lanczos quadrature)")
    ax.grid(alpha=0.3)
    if top:
        ax.text(
            0.99,
            0.95,
            "red: top eigenvalues (Lanczos)",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="#c0392b",
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(
    summary: SpectrumSummary, path: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write every figure of ``summary`` (plus ``extra`` metadata) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), **summary.to_dict()}
    path.write_text(json.dumps(payload, indent=1))
    return path
