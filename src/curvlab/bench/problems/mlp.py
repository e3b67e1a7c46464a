"""A ReLU MLP classifier on digits (8×8, shipped with scikit-learn) or Fashion-MNIST (28×28).

Minibatch cross-entropy training, validation and test accuracy as for every
:class:`~curvlab.bench.problems.classifiers.ImageClassifier`. The Fashion-MNIST MLP (784-256-256-10) follows the research notes' e1; the digits MLP (64-64-10) is its small sibling,
in the spirit of AlgoPerf's MNIST development workload (Dahl et al. 2023, arXiv 2306.07179).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from curvlab.bench.problems.classifiers import ImageClassifier

__all__ = ["MLPClassifier"]


@dataclass
class MLPClassifier(ImageClassifier):
    """MLP ``in - hidden... - 10`` with ReLU on an image data set, minibatch cross-entropy.

    Example:
        >>> inst = MLPClassifier().build(seed=0)
        >>> 0.0 <= inst.evaluate()["valid_accuracy"] <= 1.0
        True
    """

    hidden: tuple[int, ...] = field(default=(64,))
    name: str = "digits-mlp"
    description: str = "MLP 64-64-10 (ReLU) on scikit-learn digits, batch 64, accuracy"

    flatten_inputs = True

    def network(self, input_shape: tuple[int, ...], generator: torch.Generator) -> nn.Module:
        """Linear layers with torch's default initialisation drawn from ``generator``."""
        sizes = [input_shape[0], *self.hidden, 10]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            lin = nn.Linear(sizes[i], sizes[i + 1])
            bound = 1.0 / sizes[i] ** 0.5
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=generator)
                lin.bias.uniform_(-bound, bound, generator=generator)
            layers.append(lin)
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
