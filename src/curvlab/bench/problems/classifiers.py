"""The image classifiers' shared part: data (digits 8×8, Fashion-MNIST 28×28), training, scoring.

:class:`ImageClassifier` is the problem of the MLP and the CNN: minibatch cross-entropy on the
training split, test accuracy on a fixed held-out split (digits: 500 images chosen with seed 0;
Fashion-MNIST: the official 10,000-image test set). A subclass only builds its network.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from curvlab.bench.problems.base import Problem, ProblemInstance, epoch_sampler
from curvlab.datasets import digits, fashion_mnist, fashion_mnist_arrays, fashion_mnist_available
from curvlab.errors import DataNotFoundError

__all__ = ["ImageClassifier", "accuracy_eval", "check_image_data", "image_data"]


@lru_cache(maxsize=4)
def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    images, labels = digits()
    x = images.numpy().reshape(-1, 8, 8)
    y = labels.numpy()
    # Fixed split (seed 0, independent of the run seed): 1,297 train / 500 test.
    perm = np.random.default_rng(0).permutation(len(y))
    test, train = perm[:500], perm[500:]
    mean, std = float(x[train].mean()), float(x[train].std())
    x = (x - mean) / std
    t = torch.from_numpy
    return t(x[train]).unsqueeze(1), t(y[train]), t(x[test]).unsqueeze(1), t(y[test])


@lru_cache(maxsize=2)
def _fashion(train_subset: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xtr, ytr = fashion_mnist("train", train_subset)
    xte, yte = fashion_mnist("test")
    mean, std = 0.2860, 0.3530
    return ((xtr - mean) / std).unsqueeze(1), ytr, ((xte - mean) / std).unsqueeze(1), yte


def image_data(
    dataset: str, train_subset: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [n,1,h,w], y_train, x_test, y_test)``, standardised (digits or fashion-mnist)."""
    if dataset == "digits":
        return _digits()
    if dataset == "fashion-mnist":
        return _fashion(train_subset)
    raise DataNotFoundError(f"unknown image data set {dataset!r}; known: digits, fashion-mnist")


def check_image_data(dataset: str) -> None:
    """Raise DataNotFoundError (with how-to) if the data set's files are absent."""
    if dataset == "fashion-mnist" and not fashion_mnist_available():
        fashion_mnist_arrays()  # raises with the how-to message


def accuracy_eval(
    model: torch.nn.Module, x: Tensor, y: Tensor, chunk: int = 2000
) -> dict[str, float]:
    """Test accuracy and cross-entropy of ``model`` on ``(x, y)``, in chunks, without grad."""
    model.eval()
    correct = 0
    loss = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            logits = model(x[i : i + chunk])
            correct += int((logits.argmax(1) == y[i : i + chunk]).sum())
            loss += float(
                torch.nn.functional.cross_entropy(logits, y[i : i + chunk], reduction="sum")
            )
    model.train()
    n = x.shape[0]
    return {"accuracy": correct / n, "test_loss": loss / n}


@dataclass
class ImageClassifier(Problem):
    """An image classifier on ``dataset`` trained by minibatch cross-entropy; metric: test accuracy.

    Subclasses implement :meth:`network`; inputs are ``[n, 1, h, w]`` images, flattened to
    ``[n, h*w]`` first when the subclass sets ``flatten_inputs = True``.
    """

    dataset: str = "digits"
    batch_size: int = 64
    train_subset: int | None = None
    data: str = "scikit-learn"
    budget_steps: int = 300
    eval_every: int = 25

    flatten_inputs = False

    @abstractmethod
    def network(self, input_shape: tuple[int, ...], generator: torch.Generator) -> torch.nn.Module:
        """The network for inputs of ``input_shape`` (one example), initialised from ``generator``."""

    def check_data(self) -> None:
        check_image_data(self.dataset)

    def build(self, seed: int) -> ProblemInstance:
        xtr, ytr, xte, yte = image_data(self.dataset, self.train_subset)
        if self.flatten_inputs:
            xtr, xte = xtr.flatten(1), xte.flatten(1)
        gen = torch.Generator().manual_seed(seed)
        model = self.network(tuple(xtr.shape[1:]), gen)
        return ProblemInstance(
            model=model,
            loss_fn=torch.nn.functional.cross_entropy,
            next_batch=epoch_sampler(xtr, ytr, self.batch_size, gen),
            evaluate=lambda: accuracy_eval(model, xte, yte),
            outputs_are_logits=True,
        )
