"""μP: the optimal learning rate transfers across widths; under SP it drifts.

A digits MLP 64 → n → n → 10 (ReLU) is trained by Adam for a few hundred mini-batch steps at every
width n and every learning rate of a log2 grid, parametrised by :func:`curvlab.parametrize` as SP
or μP (base width = the smallest width). The final training loss gives the best learning rate per
width; Yang & Hu et al. (Tensor Programs V) predict it stays put under μP and shifts (down, ~1/n
for Adam's hidden weights) under SP. The drift is reported in log2 units between the smallest and
the largest width.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.datasets import digits
from curvlab.errors import InvalidArgumentError
from curvlab.parametrize import parametrize
from curvlab.phenomena._common import (
    PhenomenonResult,
    SeededConfig,
    finish,
    minibatch_backward,
    progress,
)

__all__ = ["MuPConfig", "mup_transfer"]


@dataclass(frozen=True)
class MuPConfig(SeededConfig):
    """Widths, the log2 learning-rate grid and the training length."""

    _unchecked = ("log2_lrs",)  # exponents of either sign

    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    log2_lrs: tuple[int, ...] = (-13, -12, -11, -10, -9, -8, -7, -6, -5, -4)
    steps: int = 150
    batch_size: int = 128

    def _check(self) -> None:
        if len(self.widths) < 2 or min(self.widths) < 1 or len(self.log2_lrs) < 3:
            raise InvalidArgumentError(
                f"MuPConfig needs >= 2 positive widths and >= 3 learning rates, got widths "
                f"{self.widths!r} and log2_lrs {self.log2_lrs!r}"
            )

    @classmethod
    def quick(cls) -> MuPConfig:
        """The tests' size (seconds)."""
        return cls(widths=(32, 128), log2_lrs=(-12, -10, -8, -6, -4), steps=60)


def _final_loss(kind: str, width: int, lr: float, x: Tensor, y: Tensor, cfg: MuPConfig) -> float:
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws its initialisation globally
        torch.manual_seed(cfg.seed)
        net = nn.Sequential(
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(parametrize(net, kind, min(cfg.widths), lr, "adam", gen))
    for _ in range(cfg.steps):
        minibatch_backward(net, opt, (x, y), cfg.batch_size, gen)
        opt.step()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(net(x), y))
    return loss if math.isfinite(loss) else math.inf


def mup_transfer(
    config: MuPConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> PhenomenonResult:
    """Sweep width × learning rate under SP and μP; report the argmin learning rate per width.

    ``numbers[kind]`` holds the loss grid (width × lr), the best log2 lr per width and the drift
    (best log2 lr at the largest width minus at the smallest). Checks: |drift| ≤ 1 under μP and
    ≥ 2 under SP.

    Paper: Yang, Hu et al., "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
    Hyperparameter Transfer" (2022); Yang & Hu, "Feature Learning in Infinite-Width Neural
    Networks", ICML 2021 (seed B44).
    """
    cfg = config or MuPConfig()
    x, y = digits(standardize=True)
    numbers: dict[str, Any] = {"config": asdict(cfg)}
    runs = [(k, w) for k in ("sp", "mup") for w in cfg.widths]
    for kind, width in progress(runs, len(runs), "μP sweep", progress_bar):
        grid = [_final_loss(kind, width, 2.0**e, x, y, cfg) for e in cfg.log2_lrs]
        entry = numbers.setdefault(kind, {"losses": [], "best_log2_lr": []})
        entry["losses"].append(grid)
        entry["best_log2_lr"].append(cfg.log2_lrs[min(range(len(grid)), key=grid.__getitem__)])
    for kind in ("sp", "mup"):
        best = numbers[kind]["best_log2_lr"]
        numbers[kind]["drift_log2"] = best[-1] - best[0]
    sp, mu = numbers["sp"]["drift_log2"], numbers["mup"]["drift_log2"]
    numbers["checks"] = {
        "mup_best_lr_drift_at_most_1_log2": abs(mu) <= 1,
        "sp_drift_at_least_2_log2": abs(sp) >= 2,
    }
    note = (
        f"best log2 lr per width {list(cfg.widths)}: SP {numbers['sp']['best_log2_lr']} (drift "
        f"{sp:+d}), μP {numbers['mup']['best_log2_lr']} (drift {mu:+d}); Adam, {cfg.steps} steps."
    )
    result = PhenomenonResult.from_checks(
        "mup",
        numbers,
        note,
        (
            f"Digits MLP, Adam: final training loss against learning rate per width; the best "
            f"learning rate moves {sp:+d} log2 units from width {cfg.widths[0]} to "
            f"{cfg.widths[-1]} under SP and {mu:+d} under μP.",
            "Yang & Hu et al. (Tensor Programs V): under μP the optimal learning rate is stable "
            "across widths; under SP it shifts with width.",
        ),
    )

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2, sharey=True)
        for ax, kind in zip(axes, ("sp", "mup")):
            for width, grid in zip(cfg.widths, numbers[kind]["losses"]):
                ax.plot(cfg.log2_lrs, grid, "o-", label=f"width {width}")
            ax.set_xlabel("log2 learning rate")
            ax.set_title(f"{kind.upper()} (drift {numbers[kind]['drift_log2']:+d} log2)")
            ax.set_yscale("log")
        axes[0].set_ylabel("final training loss")
        axes[1].legend()

    return finish(result, out_dir, draw, figsize=(11.0, 4.5))
