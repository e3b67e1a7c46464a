"""A ReLU MLP classifier on digits (8×8, shipped with scikit-learn) or Fashion-MNIST (28×28).

Minibatch cross-entropy training; the metric is test accuracy on a fixed held-out split (digits:
500 images chosen with seed 0; Fashion-MNIST: the official 10,000-image test set). The Fashion-MNIST
MLP (784-256-256-10) follows the research notes' e1; the digits MLP (64-64-10) is its small sibling,
in the spirit of AlgoPerf's MNIST development workload (Dahl et al. 2023, arXiv 2306.07179).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from curvlab.bench.problems.base import Problem, ProblemInstance, Target, epoch_sampler
from curvlab.bench.problems.classifiers import accuracy_eval, check_image_data, image_data

__all__ = ["MLPClassifier"]


@dataclass
class MLPClassifier(Problem):
    """MLP ``in - hidden... - 10`` with ReLU on an image data set, minibatch cross-entropy.

    Example:
        >>> inst = MLPClassifier().build(seed=0)
        >>> 0.0 <= inst.evaluate()["accuracy"] <= 1.0
        True
    """

    dataset: str = "digits"
    hidden: tuple[int, ...] = field(default=(64,))
    batch_size: int = 64
    train_subset: int | None = None
    name: str = "digits-mlp"
    description: str = "MLP 64-64-10 (ReLU) on scikit-learn digits, batch 64, test accuracy"
    target: Target = field(default_factory=lambda: Target("accuracy", 0.97, higher_is_better=True))
    budget_steps: int = 300
    eval_every: int = 25
    data: str = "scikit-learn"

    def check_data(self) -> None:
        check_image_data(self.dataset)

    def build(self, seed: int) -> ProblemInstance:
        xtr, ytr, xte, yte = image_data(self.dataset, self.train_subset)
        xtr, xte = xtr.flatten(1), xte.flatten(1)
        gen = torch.Generator().manual_seed(seed)
        sizes = [xtr.shape[1], *self.hidden, 10]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            lin = nn.Linear(sizes[i], sizes[i + 1])
            bound = 1.0 / sizes[i] ** 0.5
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=gen)
                lin.bias.uniform_(-bound, bound, generator=gen)
            layers.append(lin)
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
        return ProblemInstance(
            model=model,
            loss_fn=nn.functional.cross_entropy,
            next_batch=epoch_sampler(xtr, ytr, self.batch_size, gen),
            evaluate=lambda: accuracy_eval(model, xte, yte),
            outputs_are_logits=True,
        )
