"""Compression with curvature: OBS against magnitude pruning, trace-based bit allocation.

A ReLU MLP (default 64-64-32-10) is trained briefly, full batch with Adam and a fixed seed, on the
``num_train`` of scikit-learn's 1,797 digits drawn by a seeded permutation; the rest are the test
set.

Pruning (M-FAC paper, Frantar, Kurtic & Alistarh 2021, Section 4; Hassibi & Stork 1993): at each
sparsity, a copy of the trained model is pruned once by :func:`curvlab.compress.prune` with
``method="obs"`` (blocked inverse empirical Fisher through M-FAC's Woodbury coefficients, with the
OBS weight update) and once with ``method="magnitude"`` (global), without fine-tuning; the claim is
that OBS keeps more test accuracy at every sparsity.

Bit allocation (HAWQ-V2, Dong et al. 2020): :func:`curvlab.layer_sensitivity` measures each
layer's Hessian trace and top eigenvalue on the training data; for each budget (average bits per
parameter) :meth:`~curvlab.estimators.results.LayerSensitivity.allocate_bits` picks the bits by the
trace (HAWQ-V2) and by the top eigenvalue (HAWQ v1's measure), and the fake-quantised models are
evaluated. Uniform quantisation at the largest choice that fits the budget is the baseline. The
claim is that trace-based allocation costs less accuracy than top-eigenvalue-based allocation and
uniform bits at the same model size. When both measures pick the same bits the comparison is not
distinguishable at this scale, and the check says so (``False``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena._common import PhenomenonResult, SeededConfig, finish, seeded_mlp

__all__ = ["CompressionConfig", "compression"]


@dataclass(frozen=True)
class CompressionConfig(SeededConfig):
    """Model, training and compression settings of the compression run."""

    _unchecked = ("sparsities",)  # in [0, 1): checked below

    hidden: tuple[int, ...] = (64, 32)
    num_train: int = 1200
    train_steps: int = 300
    lr: float = 1e-2
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    blocks: int = 128
    num_grads: int = 256
    damp: float = 1e-4
    prune_steps: int = 4
    budgets: tuple[float, ...] = (3.0, 3.5, 4.0)
    choices: tuple[int, ...] = (2, 3, 4, 6, 8)
    trace_matvecs: int = 100

    def _check(self) -> None:
        if not 0 < self.num_train < 1797:
            raise InvalidArgumentError(
                f"CompressionConfig.num_train must be in (0, 1797) to leave a test set of the "
                f"1,797 digits, got {self.num_train}"
            )
        if not all(0 <= s < 1 for s in self.sparsities) or not self.sparsities:
            raise InvalidArgumentError(
                f"CompressionConfig.sparsities must be in [0, 1), got {self.sparsities!r}"
            )
        if not self.budgets or min(self.budgets) < min(self.choices, default=0):
            raise InvalidArgumentError(
                f"CompressionConfig.budgets {self.budgets!r} must be >= the smallest choice of "
                f"{self.choices!r}"
            )

    @classmethod
    def quick(cls) -> CompressionConfig:
        """The tests' size (seconds)."""
        return cls(sparsities=(0.5, 0.8), train_steps=150, num_grads=128, budgets=(3.5,))


def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    with torch.no_grad():
        out = model(x)
    return {
        "accuracy": float((out.argmax(1) == y).double().mean()),
        "loss": float(nn.functional.cross_entropy(out, y)),
    }


class _Trained(NamedTuple):
    """The dense model and the digits it was trained on (``train``) and is tested on (``test``)."""

    model: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def _train(cfg: CompressionConfig) -> _Trained:
    from curvlab.datasets import digits

    x, y = digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    train, test = order[: cfg.num_train], order[cfg.num_train :]
    xtr, ytr, xte, yte = x[train], y[train], x[test], y[test]
    model = seeded_mlp((64, *cfg.hidden, 10), nn.ReLU, cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.train_steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return _Trained(model, (xtr, ytr), (xte, yte))


def _pruning(cfg: CompressionConfig, trained: _Trained) -> dict[str, Any]:
    from curvlab.compress import prune

    model, train, test = trained

    rows: dict[str, Any] = {"sparsity": list(cfg.sparsities), "obs": [], "magnitude": []}
    for s in cfg.sparsities:
        for method in ("obs", "magnitude"):
            net = copy.deepcopy(model)
            prune(
                net,
                nn.functional.cross_entropy,
                train,
                s,
                method=method,
                blocks=cfg.blocks,
                num_grads=cfg.num_grads,
                damp=cfg.damp,
                steps=cfg.prune_steps,
            )
            rows[method].append(_evaluate(net, *test))
    return rows


def _allocation(cfg: CompressionConfig, trained: _Trained) -> dict[str, Any]:
    from curvlab.compress import fake_quantize, quantization_perturbation
    from curvlab.estimators.layerwise import layer_sensitivity

    model, train, test = trained

    sens = layer_sensitivity(
        model,
        nn.functional.cross_entropy,
        train,
        num_matvecs=cfg.trace_matvecs,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    pert = quantization_perturbation(model, sens.names, cfg.choices)
    total = sum(sens.num_params)

    def scored(bits: dict[str, int]) -> dict[str, Any]:
        size = sum(n * bits[name] for name, n in zip(sens.names, sens.num_params)) / total
        return {"bits": bits, "average_bits": size, **_evaluate(fake_quantize(model, bits), *test)}

    rows = []
    for budget in cfg.budgets:
        uniform = max(b for b in cfg.choices if b <= budget)
        rows.append(
            {
                "budget": budget,
                "trace": scored(sens.allocate_bits(budget, cfg.choices, perturbation=pert)),
                "top_eigenvalue": scored(
                    sens.allocate_bits(budget, cfg.choices, perturbation=pert, by="top_eigenvalue")
                ),
                "uniform": scored(dict.fromkeys(sens.names, uniform)),
            }
        )
    return {"layers": sens.rows(), "perturbation": pert, "budgets": rows}


def _allocation_checks(rows: list[dict[str, Any]]) -> tuple[dict[str, bool], str]:
    """Trace vs top eigenvalue and vs uniform at each budget (test loss; ties are not wins)."""
    same = all(r["trace"]["bits"] == r["top_eigenvalue"]["bits"] for r in rows)
    beats_top = not same and all(r["trace"]["loss"] <= r["top_eigenvalue"]["loss"] for r in rows)
    equal_size = [r for r in rows if r["uniform"]["average_bits"] == r["budget"]]
    beats_uniform = bool(equal_size) and all(
        r["trace"]["loss"] < r["uniform"]["loss"] for r in equal_size
    )
    verdict = (
        "trace and top eigenvalue picked identical bits at every budget: not distinguishable at "
        "this scale"
        if same
        else ("trace beats top eigenvalue" if beats_top else "trace does NOT beat top eigenvalue")
    )
    checks = {
        "trace_allocation_beats_top_eigenvalue": beats_top,
        "trace_allocation_beats_uniform_at_equal_size": beats_uniform,
    }
    return checks, verdict


def compression(
    config: CompressionConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Prune (OBS vs magnitude) and quantise (trace vs top-eigenvalue vs uniform bits) a digits MLP.

    Returns a :class:`~curvlab.phenomena.PhenomenonResult` whose ``numbers`` hold the dense test
    accuracy and loss, ``"pruning"`` (test accuracy and loss of both methods per sparsity) and
    ``"allocation"`` (per-layer trace and top eigenvalue, and per budget the bits, average bits,
    test accuracy and loss of the three allocations), and ``"allocation_verdict"``.

    Example:
        >>> from curvlab.phenomena import compression, CompressionConfig
        >>> res = compression(CompressionConfig(sparsities=(0.7,), train_steps=100, num_grads=64))
        >>> p = res.numbers["pruning"]
        >>> p["obs"][0]["accuracy"] > p["magnitude"][0]["accuracy"]
        True

    Papers: Frantar, Kurtic & Alistarh, arXiv 2107.03356 (M-FAC, Section 4); Dong et al.,
    NeurIPS 2020, arXiv 1911.03852 (HAWQ-V2).
    """
    cfg = config or CompressionConfig()
    trained = _train(cfg)
    dense = _evaluate(trained.model, *trained.test)
    pruning = _pruning(cfg, trained)
    alloc = _allocation(cfg, trained)
    alloc_checks, verdict = _allocation_checks(alloc["budgets"])
    checks = {
        f"obs_beats_magnitude_at_{s:g}": o["accuracy"] > m["accuracy"]
        for s, o, m in zip(cfg.sparsities, pruning["obs"], pruning["magnitude"])
    }
    checks.update(alloc_checks)
    numbers: dict[str, Any] = {
        "config": asdict(cfg),
        "checks": checks,
        "dense": dense,
        "pruning": pruning,
        "allocation": alloc,
        "allocation_verdict": verdict,
    }
    acc = ", ".join(
        f"{s:.0%} {o['accuracy']:.3f} vs {m['accuracy']:.3f}"
        for s, o, m in zip(cfg.sparsities, pruning["obs"], pruning["magnitude"])
    )
    budgets = "; ".join(
        f"budget {r['budget']:g}: trace {list(r['trace']['bits'].values())} acc "
        f"{r['trace']['accuracy']:.3f}, top-eig {list(r['top_eigenvalue']['bits'].values())} acc "
        f"{r['top_eigenvalue']['accuracy']:.3f}, uniform {r['uniform']['average_bits']:g} bits acc "
        f"{r['uniform']['accuracy']:.3f}"
        for r in alloc["budgets"]
    )
    note = (
        f"dense test accuracy {dense['accuracy']:.3f}; OBS vs magnitude test accuracy: {acc}. "
        f"{budgets}. Allocation: {verdict}."
    )
    ahead = [f"{s:.0%}" for s, o, m in zip(cfg.sparsities, pruning["obs"], pruning["magnitude"])
             if o["accuracy"] > m["accuracy"]]  # fmt: skip
    behind = [f"{s:.0%}" for s in cfg.sparsities if f"{s:.0%}" not in ahead]
    standing = f"OBS ahead at {', '.join(ahead) or 'no sparsity'}" + (
        f", NOT at {', '.join(behind)}" if behind else ""
    )
    result = PhenomenonResult.from_checks(
        "compression",
        numbers,
        note,
        (
            f"Left: test accuracy of the digits MLP pruned without fine-tuning, OBS on M-FAC's "
            f"inverse Fisher vs global magnitude ({standing}); right: HAWQ-V2 bit allocation by "
            f"trace vs top eigenvalue vs uniform bits ({verdict}).",
            "M-FAC/OBS: second-order pruning keeps more accuracy than magnitude pruning at high "
            "sparsity; HAWQ-V2: trace-based allocation beats top-eigenvalue-based and uniform "
            "allocation at the same model size.",
        ),
    )

    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        xs = [100 * s for s in cfg.sparsities]
        for method, marker in (("obs", "o-"), ("magnitude", "s--")):
            ax1.plot(xs, [r["accuracy"] for r in pruning[method]], marker, label=method)
        ax1.axhline(dense["accuracy"], color="gray", lw=0.8, label="dense")
        ax1.set_xlabel("sparsity (%)")
        ax1.set_ylabel("test accuracy")
        ax1.set_title("OBS vs magnitude pruning (no fine-tuning)")
        ax1.legend()
        width = 0.25
        for i, key in enumerate(("trace", "top_eigenvalue", "uniform")):
            pos = [j + (i - 1) * width for j in range(len(alloc["budgets"]))]
            ax2.bar(pos, [r[key]["accuracy"] for r in alloc["budgets"]], width, label=key)
        ax2.set_xticks(range(len(alloc["budgets"])))
        ax2.set_xticklabels([f"{r['budget']:g} bits" for r in alloc["budgets"]])
        ax2.set_ylabel("test accuracy")
        ax2.set_title("bit allocation at a size budget")
        ax2.legend()

    return finish(result, out_dir, draw, figsize=(12.0, 4.5))
