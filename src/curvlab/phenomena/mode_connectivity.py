"""Linear mode connectivity: SGD runs that share an initialisation end linearly connected.

Three SGD runs of a digits MLP: A and B start from the same initialisation and see the data in
different orders; C starts from another initialisation. The loss barrier along the straight line
θ(α) = (1 − α)θ_A + αθ_B (max over α of the loss above the chord between the endpoints, see
:func:`curvlab.landscape.interpolate`) is measured for A–B and A–C, for the whole model and one
layer at a time. Frankle et al. (and the layer-wise view of "Landscaping linear mode
connectivity") predict a small barrier when the runs share their start and a large one between
independent starts (hidden units permuted relative to each other).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.datasets import digits
from curvlab.landscape import interpolate
from curvlab.phenomena._common import PhenomenonResult, SeededConfig, finish, seeded_mlp

__all__ = ["ModeConnectivityConfig", "mode_connectivity"]


@dataclass(frozen=True)
class ModeConnectivityConfig(SeededConfig):
    """Sizes of the three SGD runs and of the interpolation."""

    width: int = 128
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    num_alphas: int = 21
    barrier_ratio: float = 3.0

    @classmethod
    def quick(cls) -> ModeConnectivityConfig:
        """The tests' size (about a second)."""
        return cls(width=32, epochs=3, num_alphas=7)


def _train(model: nn.Module, x: Tensor, y: Tensor, cfg: ModeConnectivityConfig, order: int) -> None:
    gen = torch.Generator().manual_seed(order)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def mode_connectivity(
    config: ModeConnectivityConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Train A, B (same init, other data order) and C (other init); measure the loss barriers.

    ``numbers`` holds each pair's loss curve, whole-model and layer-wise barriers, and the
    endpoints' losses. Checks: the same-init barrier is below 0.05 and ``barrier_ratio`` times
    smaller than the different-init barrier.

    Paper: Frankle, Dziugaite, Roy & Carbin, ICML 2020; "Landscaping Linear Mode Connectivity"
    (seed B35).
    """
    cfg = config or ModeConnectivityConfig()
    x, y = digits(standardize=True)
    sizes = (64, cfg.width, cfg.width, 10)
    models = {
        "A": seeded_mlp(sizes, nn.ReLU, cfg.seed),
        "B": seeded_mlp(sizes, nn.ReLU, cfg.seed),
        "C": seeded_mlp(sizes, nn.ReLU, cfg.seed + 1),
    }
    for order, model in zip((cfg.seed, cfg.seed + 1, cfg.seed), models.values()):
        _train(model, x, y, cfg, order)
    loss_fn = nn.CrossEntropyLoss()
    pairs = {
        name: interpolate(models["A"], models[other], loss_fn, (x, y), cfg.num_alphas, True)
        for name, other in (("same_init", "B"), ("different_init", "C"))
    }
    same, diff = pairs["same_init"], pairs["different_init"]
    checks = {
        "same_init_barrier_below_0.05": same.barrier < 0.05,
        f"different_init_barrier_{cfg.barrier_ratio:g}x_larger": diff.barrier
        > cfg.barrier_ratio * max(same.barrier, 1e-3),
    }
    numbers: dict[str, Any] = {
        "config": asdict(cfg),
        "checks": checks,
        **{
            name: {
                "alphas": r.alphas,
                "losses": r.losses,
                "barrier": r.barrier,
                "layer_barriers": r.layer_barriers,
                "layer_losses": r.layer_losses,
            }
            for name, r in pairs.items()
        },
    }
    layer_text = ", ".join(
        f"layer {k}: {same.layer_barriers[k]:.3f} / {diff.layer_barriers[k]:.3f} (loss with B's/C's "
        f"layer in A: {same.layer_losses[k][-1]:.3f} / {diff.layer_losses[k][-1]:.2f})"
        for k in same.layer_barriers
    )
    note = (
        f"whole-model barrier {same.barrier:.3f} (same init, other data order) vs "
        f"{diff.barrier:.3f} (other init); endpoint losses {same.losses[0]:.3f}, "
        f"{same.losses[-1]:.3f}, {diff.losses[-1]:.3f}; layer-wise barriers (same / other) "
        f"{layer_text}: one layer alone never rises above its chord, but another init's layer "
        "does not fit A's other layers."
    )
    result = PhenomenonResult.from_checks(
        "mode-connectivity",
        numbers,
        note,
        (
            f"Digits MLP: training loss along the straight line between two SGD solutions; barrier "
            f"{same.barrier:.3f} from a shared init, {diff.barrier:.3f} from different inits "
            "(right: layer-wise barriers).",
            "Frankle et al.: runs sharing their start (and stable to SGD noise) are linearly mode "
            "connected; independent starts are separated by a barrier.",
        ),
    )

    def draw(fig: Any) -> None:
        left, right = fig.subplots(1, 2)
        for name, r in pairs.items():
            left.plot(r.alphas, r.losses, "o-", label=f"{name} (barrier {r.barrier:.3f})")
        left.set_xlabel("α")
        left.set_ylabel("training loss (cross-entropy)")
        left.set_title("θ(α) = (1 − α)θ_A + αθ_B")
        left.legend()
        layers = list(same.layer_barriers)
        pos = torch.arange(len(layers), dtype=torch.float64).numpy()
        right.bar(pos - 0.2, [same.layer_barriers[k] for k in layers], 0.4, label="same init")
        right.bar(pos + 0.2, [diff.layer_barriers[k] for k in layers], 0.4, label="other init")
        right.set_xticks(pos, [f"layer {k}" for k in layers])
        right.set_ylabel("barrier (one layer interpolated)")
        right.set_title("Layer-wise barriers")
        right.legend()

    return finish(result, out_dir, draw, figsize=(11.0, 4.5))
