"""A small CNN classifier (conv-pool-conv-pool-linear) on digits or Fashion-MNIST.

DeepOBS's ``fmnist_2c2d`` in miniature (Schneider, Balles & Hennig 2019): two 3×3 convolutions with
ReLU and 2×2 max-pooling, then a linear layer; trained and scored as every
:class:`~curvlab.bench.problems.classifiers.ImageClassifier`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from curvlab.bench.problems.classifiers import ImageClassifier

__all__ = ["CNNClassifier"]


@dataclass
class CNNClassifier(ImageClassifier):
    """CNN ``conv(c1) - pool - conv(c2) - pool - linear(10)`` with ReLU, minibatch cross-entropy.

    Example:
        >>> inst = CNNClassifier().build(seed=0)
        >>> sum(p.numel() for p in inst.model.parameters())
        1898
    """

    channels: tuple[int, int] = (8, 16)
    name: str = "digits-cnn"
    description: str = "CNN conv8-pool-conv16-pool-fc on scikit-learn digits, batch 64, accuracy"

    def network(self, input_shape: tuple[int, ...], generator: torch.Generator) -> nn.Module:
        """The CNN with uniform(±1/sqrt(fan_in)) weights and biases drawn from ``generator``."""
        side = input_shape[-1]
        c1, c2 = self.channels
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
                p.uniform_(-bound, bound, generator=generator)
        return model
