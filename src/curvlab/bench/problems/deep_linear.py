"""A deep linear network on whitened inputs (Saxe, McClelland & Ganguli 2014, arXiv 1312.6120).

The network computes ``W_L ⋯ W_1 x`` with square ``d×d`` layers initialised at a small scale; the
target map is ``T = U diag(s) Vᵀ`` with random orthogonal ``U, V`` (fixed across seeds) and singular
values ``s = (6, 4, 2, 1, 0, …)``. With whitened inputs (here the identity batch) the loss is
``½ ‖W_L ⋯ W_1 − T‖²_F / d``: learning shows plateaus and sharp transitions, one per mode, on time
scales ∝ 1/sᵢ. The exact relative error ``rel_error = ‖W − T‖²_F / ‖T‖²_F`` is recorded; the target
metric is its estimate on held-out Gaussian inputs ``X`` (``held_out`` of them per split, seeded by
the run's seed and the split), ``‖(W − T) X‖²_F / ‖T X‖²_F`` (``valid_rel_error``; the final quality
``test_rel_error`` on other inputs). float64, full batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab.bench.problems.base import (
    Problem,
    ProblemInstance,
    Target,
    gaussian_held_out,
    gaussian_held_out_splits,
)
from curvlab.bench.problems.quadratic import random_rotation

__all__ = ["DeepLinearNetwork"]


@dataclass
class DeepLinearNetwork(Problem):
    """Saxe's deep linear network with ``depth`` layers of width ``dim``.

    Example:
        >>> inst = DeepLinearNetwork().build(seed=0)
        >>> round(inst.evaluate()["rel_error"], 3)
        1.0
    """

    dim: int = 8
    depth: int = 2
    singular_values: tuple[float, ...] = field(default=(6.0, 4.0, 2.0, 1.0))
    init_scale: float = 1e-3
    held_out: int = 256
    name: str = "deep-linear"
    description: str = "deep linear network (Saxe), 2 layers 8x8, target modes s=(6,4,2,1)"
    target: Target = field(default_factory=lambda: Target("valid_rel_error"))
    budget_steps: int = 400
    splits: dict[str, str] = field(
        default_factory=lambda: gaussian_held_out_splits(
            "the whitened inputs (identity batch)", "Gaussian inputs"
        )
    )

    def build(self, seed: int) -> ProblemInstance:
        dt = torch.float64
        data_gen = torch.Generator().manual_seed(4242)
        s = torch.zeros(self.dim, dtype=dt)
        s[: len(self.singular_values)] = torch.tensor(self.singular_values, dtype=dt)
        t = (
            random_rotation(self.dim, data_gen, dt)
            @ torch.diag(s)
            @ random_rotation(self.dim, data_gen, dt).T
        )
        gen = torch.Generator().manual_seed(seed)
        layers = []
        for _ in range(self.depth):
            lin = nn.Linear(self.dim, self.dim, bias=False).to(dt)
            with torch.no_grad():
                lin.weight.copy_(
                    self.init_scale * torch.randn(self.dim, self.dim, generator=gen, dtype=dt)
                )
            layers.append(lin)
        model = nn.Sequential(*layers)
        x = torch.eye(self.dim, dtype=dt)
        y = x @ t.T
        t_norm2 = float((t**2).sum())
        held_out = gaussian_held_out(seed, self.held_out, self.dim, dt)

        def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
            return 0.5 * ((outputs - targets) ** 2).sum() / self.dim

        def evaluate() -> dict[str, float]:
            with torch.no_grad():
                err = float(((model(x) - y) ** 2).sum())
                metrics = {"rel_error": err / t_norm2, "loss": 0.5 * err / self.dim}
                for split, xs in held_out.items():
                    ys = xs @ t.T
                    metrics[f"{split}_rel_error"] = float(
                        ((model(xs) - ys) ** 2).sum() / (ys**2).sum()
                    )
            return metrics

        return ProblemInstance(
            model=model, loss_fn=loss_fn, next_batch=lambda: (x, y), evaluate=evaluate
        )
