"""A small CNN classifier (conv-pool-conv-pool-linear) on digits or Fashion-MNIST.

DeepOBS's ``fmnist_2c2d`` in miniature (Schneider, Balles & Hennig 2019): two 3×3 convolutions with
ReLU and 2×2 max-pooling, then a linear layer; minibatch cross-entropy; metric: test accuracy on
the fixed held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from curvlab.bench.problems.base import Problem, ProblemInstance, Target, epoch_sampler
from curvlab.bench.problems.classifiers import accuracy_eval, check_image_data, image_data

__all__ = ["CNNClassifier"]


@dataclass
class CNNClassifier(Problem):
    """CNN ``conv(c1) - pool - conv(c2) - pool - linear(10)`` with ReLU, minibatch cross-entropy.

    Example:
        >>> inst = CNNClassifier().build(seed=0)
        >>> sum(p.numel() for p in inst.model.parameters())
        1898
    """

    dataset: str = "digits"
    channels: tuple[int, int] = (8, 16)
    batch_size: int = 64
    train_subset: int | None = None
    name: str = "digits-cnn"
    description: str = (
        "CNN conv8-pool-conv16-pool-fc on scikit-learn digits, batch 64, test accuracy"
    )
    target: Target = field(default_factory=lambda: Target("accuracy", 0.95, higher_is_better=True))
    budget_steps: int = 300
    eval_every: int = 25
    data: str = "scikit-learn"

    def check_data(self) -> None:
        check_image_data(self.dataset)

    def build(self, seed: int) -> ProblemInstance:
        xtr, ytr, xte, yte = image_data(self.dataset, self.train_subset)
        side = xtr.shape[-1]
        c1, c2 = self.channels
        gen = torch.Generator().manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (side // 4) ** 2, 10),
        )
        with torch.no_grad():
            for p in model.parameters():
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                bound = 1.0 / max(fan_in, 1) ** 0.5
                p.uniform_(-bound, bound, generator=gen)
        return ProblemInstance(
            model=model,
            loss_fn=nn.functional.cross_entropy,
            next_batch=epoch_sampler(xtr, ytr, self.batch_size, gen),
            evaluate=lambda: accuracy_eval(model, xte, yte),
            outputs_are_logits=True,
        )
